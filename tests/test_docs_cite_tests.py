"""Every test the docs cite (``test_file.py::test_name``, ``…::test_name`` for the row
above's file) exists, so a documented guarantee cannot point at nothing."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"`((?:test_\w+\.py)|…)::(test_\w+)")


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_every_cited_test_exists():
    cited, missing = 0, []
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        current = None
        for file, name in CITATION.findall(doc.read_text()):
            current = current if file == "…" else file
            if current is None:
                missing.append(f"{doc.name}: …::{name} with no file named before it")
                continue
            cited += 1
            path = ROOT / "tests" / current
            if not path.is_file() or name not in _defined_tests(path):
                missing.append(f"{doc.name}: {current}::{name}")
    assert cited > 50  # the reliability table alone cites more
    assert not missing, missing

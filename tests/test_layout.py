"""The package's import arrows run one way (docs/ARCHITECTURE.md), with no cycles."""

import ast
from pathlib import Path

import mergekit_lrp

PACKAGE = Path(mergekit_lrp.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module a source file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import"
            for alias in node.names:  # `from package import submodule` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return found


def module_name(path: Path) -> str:
    name = "mergekit_lrp." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def sources(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def offending(subpackage: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sources(subpackage)
        for name in sorted(imports_of(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def test_the_score_format_imports_neither_side():
    assert sources("scores")
    assert offending("scores", ("mergekit", "mergekit_lrp.scoring", "mergekit_lrp.merging")) == []


def test_scoring_never_imports_merging_or_mergekit():
    assert sources("scoring")
    forbidden = ("mergekit", "mergekit_lrp.merging", "mergekit_lrp.plugin")
    assert offending("scoring", forbidden) == []


def test_scoring_never_imports_back_up_into_the_package_root():
    found = [
        f"{path.relative_to(PACKAGE)} imports mergekit_lrp"
        for path in sources("scoring")
        if "mergekit_lrp" in imports_of(path)
    ]
    assert found == []


def test_the_merge_rules_shared_with_the_api_and_inspect_import_no_mergekit():
    """Parameter checks, selection, tensor names, masks, the Gram solve, the method table
    and lrp's spec (its settings and per-tensor reading) are used outside a merge."""
    for module in ("parameters", "selection", "tensor_names", "masks", "gram_solve",
                   "methods/__init__", "methods/lrp"):  # fmt: skip
        path = PACKAGE / "merging" / f"{module}.py"
        assert not [name for name in imports_of(path) if name.split(".")[0] == "mergekit"]


def test_merging_never_imports_the_autograd_rules():
    assert sources("merging")
    assert offending("merging", ("mergekit_lrp.scoring", "lxt", "mergekit_lrp.plugin")) == []


def test_inspect_reads_scores_and_the_merge_selection_only():
    """lrp-inspect shows the merge's own masks without the autograd rules or mergekit."""
    assert sources("inspect")
    forbidden = ("mergekit_lrp.scoring", "lxt", "mergekit_lrp.plugin", "mergekit")
    assert offending("inspect", forbidden) == []


def test_no_import_cycles_between_modules():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        graph[module_name(path)] = {m for m in imports_of(path) if m.startswith("mergekit_lrp")}
    cycles = []

    def visit(node, trail):
        for target in graph.get(node, ()):
            if target in trail:
                cycles.append(trail[trail.index(target) :] + [target])
            elif len(trail) < 20:
                visit(target, trail + [target])

    for start in graph:
        visit(start, [start])
    assert cycles == []

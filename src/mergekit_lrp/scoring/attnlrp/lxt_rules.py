"""lxt 2.1's AttnLRP rule functions, loaded without importing the ``lxt`` package.

``import lxt`` fails on transformers 5: ``lxt/__init__.py`` pulls in a BERT patch that
imports a function transformers 5 removed. The rules live in ``lxt/efficient/rules.py``,
which only needs torch, so that one file is executed on its own, found through the
package's import spec (which locates ``lxt`` without running its ``__init__``).
"""

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

INSTALL_HINT = "install it with `pip install --no-deps lxt==2.1`"
RULE_NAMES = ("identity_rule_implicit", "divide_gradient", "stop_gradient")


@functools.cache
def load_lxt_rules() -> ModuleType:
    """Return lxt's ``efficient/rules.py`` as a module; ImportError if lxt is missing."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"AttnLRP relevance needs the lxt package: {INSTALL_HINT}")
    candidates = [Path(p) / "efficient" / "rules.py" for p in spec.submodule_search_locations]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ImportError(f"lxt is installed but has no efficient/rules.py: {INSTALL_HINT}")
    rules_spec = importlib.util.spec_from_file_location(
        "mergekit_lrp.scoring.attnlrp._lxt_rules", path
    )
    rules = importlib.util.module_from_spec(rules_spec)
    rules_spec.loader.exec_module(rules)
    missing = [name for name in RULE_NAMES if not hasattr(rules, name)]
    if missing:
        raise ImportError(f"{path} lacks {', '.join(missing)}; {INSTALL_HINT}")
    return rules

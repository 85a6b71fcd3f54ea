"""Fixes to mergekit's planner, applied by the plugin to the mergekit versions they fit.

Each patch says what it fixes; tests/test_planner.py shows the failure without it.
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType

PATCHED_MERGEKIT_VERSIONS = ("0.1.5",)
# what each patch replaced, for tests and for anyone comparing behaviour
ORIGINALS: dict[str, object] = {}


def mergekit_version_is_patched() -> bool:
    return importlib.metadata.version("mergekit") in PATCHED_MERGEKIT_VERSIONS


def ordered_referenced_models(self) -> list:
    """Models in a fixed order: the base model first, then as the config lists them.

    mergekit 0.1.5 collects them in a set, so the architecture it picks for a
    cross-family merge (the first entry) and the output config it starts from
    vary between processes (hash order; not even a fixed PYTHONHASHSEED pins it).
    """
    found = [self.base_model] if self.base_model else []
    for models, slices in [(self.models, self.slices)] + [
        (module.models, module.slices) for module in (self.modules or {}).values()
    ]:
        found.extend(model_in.model for model_in in models or ())
        for output_slice in slices or ():
            found.extend(source.model for source in output_slice.sources)
    return list(dict.fromkeys(found))


def patch_config(config_module: ModuleType) -> None:
    """Make ``MergeConfiguration.referenced_models`` deterministic."""
    if mergekit_version_is_patched():
        configuration = config_module.MergeConfiguration
        ORIGINALS.setdefault("referenced_models", configuration.referenced_models)
        configuration.referenced_models = ordered_referenced_models

"""Deterministic architecture choice: the base model's, or the first model listed."""

from __future__ import annotations

from types import ModuleType

from mergekit_lrp.plugin.planner import ORIGINALS, mergekit_version_is_patched


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
    if mergekit_version_is_patched("deterministic architecture choice"):
        configuration = config_module.MergeConfiguration
        ORIGINALS.setdefault("referenced_models", configuration.referenced_models)
        configuration.referenced_models = ordered_referenced_models

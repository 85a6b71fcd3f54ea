"""Fixes to mergekit's planner, applied by the plugin to the mergekit versions they fit.

Each patch says what it fixes; tests/test_planner.py and tests/test_hybrid.py show the
failure without it (docs/hybrid.md lists what mergekit 0.1.5 already handles).
"""

from __future__ import annotations

import functools
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


# --- checkpoint-only modules (MTP heads) --------------------------------------------------


def checkpoint_only_tensors(arch_info, merge_config, options) -> list:
    """The base checkpoint's multi-token-prediction tensors that the architecture lacks.

    transformers' Qwen3.5 / Qwen3-Next classes drop ``mtp.*`` on load on purpose
    (``_keys_to_ignore_on_load_unexpected``), so an architecture inferred from the class
    (or a JSON definition written from it) has no ``mtp.*`` weights and mergekit 0.1.5
    leaves them out of the merged checkpoint. Returned as ``WeightInfo``s, optional where
    some model's checkpoint lacks them (then the base passes through for that model).
    Only tensors matched by a class ignore pattern naming ``mtp`` are kept: other ignored
    tensors (rotary ``inv_freq`` buffers of old checkpoints, ...) stay dropped as before.
    """
    import re

    import transformers
    from mergekit.architecture import WeightInfo
    from mergekit.architecture.auto import get_model_tensor_names

    base = merge_config.base_model or merge_config.referenced_models()[0]
    config = base.config(trust_remote_code=options.trust_remote_code)
    try:  # remote-code or unknown classes: nothing to keep
        model_class = getattr(transformers, (config.architectures or [""])[0], None)
    except Exception:
        model_class = None
    patterns = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ()
    patterns = [p for p in patterns if "mtp" in p]
    if not patterns:
        return []
    covered = set()
    for weight in arch_info.all_weights(config):
        covered.update([weight.name, *(weight.aliases or ()), *(weight.tied_names or ())])
    names = sorted(
        n
        for n in get_model_tensor_names(base, options)
        if n not in covered and any(re.search(p, n) for p in patterns)
    )
    if not names:
        return []
    everywhere = set(names)
    for model in merge_config.referenced_models():
        if model != base:
            everywhere &= set(get_model_tensor_names(model, options))
    return [WeightInfo(name=n, optional=n not in everywhere) for n in names]


def with_post_weights(arch_info, extra: list):
    """``arch_info`` with ``extra`` appended to the post-weights of its unprefixed module.

    Appending keeps the module count (``slices:`` configs need exactly one module); an
    architecture without a JSON-style unprefixed module gets a separate module instead.
    """
    from mergekit.architecture import ModuleDefinition
    from mergekit.architecture.json_definitions import (
        JsonLayerTemplates,
        JsonModuleArchDef,
        JsonModuleArchitecture,
    )

    modules = dict(arch_info.modules)
    candidates = [
        name
        for name, module in modules.items()
        if module.weight_prefix is None and isinstance(module.architecture, JsonModuleArchitecture)
    ]
    if candidates:
        name = "default" if "default" in candidates else candidates[0]
        module = modules[name]
        definition = module.architecture.definition
        definition = definition.model_copy(
            update={"post_weights": [*definition.post_weights, *extra]}
        )
        modules[name] = module.model_copy(
            update={
                "architecture": module.architecture.model_copy(update={"definition": definition})
            }
        )
    else:
        modules["checkpoint_only"] = ModuleDefinition(
            architecture=JsonModuleArchitecture(
                definition=JsonModuleArchDef(
                    model_type="",
                    architectures=[],
                    pre_weights=[],
                    layer_templates=JsonLayerTemplates(weights=[]),
                    post_weights=list(extra),
                    override_num_layers=0,
                )
            )
        )
    return arch_info.model_copy(update={"modules": modules})


def keep_checkpoint_only_tensors(get_architecture_info):
    """Wrap ``get_architecture_info`` so MTP tensors are merged instead of dropped."""
    if getattr(get_architecture_info, "__mergekit_lrp_patch__", False):
        return get_architecture_info

    @functools.wraps(get_architecture_info)
    def patched(config, options):
        arch_info = get_architecture_info(config, options)
        extra = checkpoint_only_tensors(arch_info, config, options)
        return with_post_weights(arch_info, extra) if extra else arch_info

    patched.__mergekit_lrp_patch__ = True
    return patched


def patch_architecture(architecture_module: ModuleType) -> None:
    """Keep the base checkpoint's MTP tensors in merges (see checkpoint_only_tensors)."""
    if mergekit_version_is_patched():
        original = architecture_module.get_architecture_info
        ORIGINALS.setdefault("get_architecture_info", original)
        architecture_module.get_architecture_info = keep_checkpoint_only_tensors(original)


# --- optional weights that only exist after transformers' checkpoint conversion -----------


def converted_somewhere(weights_in, models, options) -> bool:
    """Whether some model's checkpoint yields one of these weights only by conversion."""
    from mergekit.architecture.conversion import can_convert_checkpoint_keys
    from mergekit.io.tasks import LoaderCache

    for model, weight in zip(models, weights_in, strict=True):
        names = set(LoaderCache().get(model).index.tensor_paths)
        model_type = model.config(trust_remote_code=options.trust_remote_code).model_type
        if any(can_convert_checkpoint_keys(model_type, names, n) for n in _names(weight)):
            return True
    return False


def _names(weight) -> list[str]:
    return [weight.name, *(weight.aliases or ())]


def plan_converted_optional_weights(plan_tensor):
    """Wrap ``MergePlanner.plan_tensor``: plan optional weights present after conversion.

    mergekit 0.1.5 skips an optional weight unless some checkpoint stores it under its
    exact name. A weight transformers 5 assembles on load (MoE experts fused from per-expert
    tensors) is never stored so, and once it is optional (MoE in only some layers, e.g.
    Qwen3-Next with ``mlp_only_layers``) every layer's experts are silently left out of
    the merge (the merged model then loads with randomly initialised experts). Such a
    weight is planned as mergekit plans present ones; ``LoadTensor`` converts it.
    """
    if getattr(plan_tensor, "__mergekit_lrp_patch__", False):
        return plan_tensor

    @functools.wraps(plan_tensor)
    def patched(self, weight, weights_in, models, cfg_reader):
        if not weight.optional or not _skipped_by_mergekit(weights_in, models):
            return plan_tensor(self, weight, weights_in, models, cfg_reader)
        if not converted_somewhere(weights_in, models, self.options):
            return plan_tensor(self, weight, weights_in, models, cfg_reader)
        # plan it as present (the unpatched check would skip it), then restore the flag
        plan_tensor(
            self, weight.model_copy(update={"optional": False}), weights_in, models, cfg_reader
        )
        _, task = self._tensors[-1]
        self._tensors[-1] = (weight, task.model_copy(update={"output_weight": weight}))

    patched.__mergekit_lrp_patch__ = True
    return patched


def _skipped_by_mergekit(weights_in, models) -> bool:
    """mergekit 0.1.5's own test in ``plan_tensor``: no model stores any of the names."""
    from mergekit.io.tasks import LoaderCache

    return not any(
        any(n in LoaderCache().get(model).index.tensor_paths for n in _names(weight))
        for model, weight in zip(models, weights_in, strict=True)
    )


def patch_plan(plan_module: ModuleType) -> None:
    """Plan optional weights that transformers' conversion produces (see above)."""
    if mergekit_version_is_patched():
        planner = plan_module.MergePlanner
        ORIGINALS.setdefault("plan_tensor", planner.plan_tensor)
        planner.plan_tensor = plan_converted_optional_weights(planner.plan_tensor)

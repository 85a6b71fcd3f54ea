"""Checkpoint-only modules (MTP heads) merged instead of dropped."""

from __future__ import annotations

import functools
from types import ModuleType

from mergekit_lrp.plugin.planner import ORIGINALS, mergekit_version_is_patched


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
    if mergekit_version_is_patched("MTP tensors kept"):
        original = architecture_module.get_architecture_info
        ORIGINALS.setdefault("get_architecture_info", original)
        architecture_module.get_architecture_info = keep_checkpoint_only_tensors(original)

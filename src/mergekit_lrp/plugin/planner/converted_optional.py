"""Optional weights that only exist after transformers' checkpoint conversion (MoE
experts in only some layers) planned instead of silently dropped."""

from __future__ import annotations

import functools
from types import ModuleType

from mergekit_lrp.plugin.planner import ORIGINALS, mergekit_version_is_patched


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
    if mergekit_version_is_patched("MoE experts in some layers kept"):
        planner = plan_module.MergePlanner
        ORIGINALS.setdefault("plan_tensor", planner.plan_tensor)
        planner.plan_tensor = plan_converted_optional_weights(planner.plan_tensor)

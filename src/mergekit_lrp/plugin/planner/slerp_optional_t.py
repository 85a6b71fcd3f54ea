"""``slerp`` with ``t`` optional: a tensor for which no ``t`` applies keeps the base
model's weight (mergekit feature request: filtered, component-wise cross-family merges)."""

from __future__ import annotations

import functools
import logging
from types import ModuleType

from mergekit_lrp.plugin.planner import ORIGINALS, mergekit_version_is_patched

METHOD = "slerp"
PARAMETER = "t"


def t_is_missing(method, cfg_reader, tensor_name: str) -> bool:
    """Whether ``slerp``'s ``t`` resolves to nothing for this tensor: the test mergekit
    0.1.5's ``resolve_parameter`` makes before raising "Missing required parameter t"
    (same sources, same precedence, same filter evaluation)."""
    from mergekit.config import evaluate_setting

    spec = next((p for p in method.spec.parameters if p.name == PARAMETER), None)
    if method.spec.name != METHOD or spec is None or not spec.required:
        return False
    for scope in cfg_reader.parameter_sources(None):
        if scope is not None and PARAMETER in scope:
            value = evaluate_setting(
                tensor_name, scope[PARAMETER], cfg_reader.t, validate=spec.validate
            )
            if value is not None:
                return False
    return True


def keep_base_without_t(plan_tensor):
    """Wrap ``MergePlanner.plan_tensor``: a ``slerp`` tensor without ``t`` is planned as
    mergekit's ``passthrough`` of the base model alone.

    mergekit 0.1.5 requires ``t`` for every tensor, so ``t`` given only for some filters
    (say the MLP projections, to carry one model's MLPs into another family's layers)
    fails planning with "Missing required parameter t". With the patch those tensors
    keep the base weight; the other model's tensor is not even read, so it may be
    absent or of another shape. A merge with a ``t`` for every tensor plans exactly as
    before.
    """
    if getattr(plan_tensor, "__mergekit_lrp_slerp_t__", False):
        return plan_tensor

    @functools.wraps(plan_tensor)
    def patched(self, weight, weights_in, models, cfg_reader):
        base = cfg_reader.base_model
        if base not in models or not t_is_missing(self._method, cfg_reader, weight.name):
            return plan_tensor(self, weight, weights_in, models, cfg_reader)
        from mergekit import merge_methods

        logging.info(f"slerp: no t for {weight.name}; keeping the base model's weight")
        index = models.index(base)
        method = self._method
        self._method = merge_methods.get("passthrough")
        try:
            return plan_tensor(self, weight, [weights_in[index]], [base], cfg_reader)
        finally:
            self._method = method

    patched.__mergekit_lrp_slerp_t__ = True
    return patched


def patch_plan(plan_module: ModuleType) -> None:
    """Let ``slerp`` tensors without ``t`` keep the base weight (see above)."""
    if mergekit_version_is_patched():
        planner = plan_module.MergePlanner
        ORIGINALS.setdefault("plan_tensor", planner.plan_tensor)
        ORIGINALS.setdefault("plan_tensor_before_slerp_t", planner.plan_tensor)
        planner.plan_tensor = keep_base_without_t(planner.plan_tensor)

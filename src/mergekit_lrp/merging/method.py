"""The ``lrp`` merge method: keep each task vector's most relevant entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (:mod:`.tensor_scores`); the top ``density`` fraction of delta_m by
importance is kept, the rest zeroed; then
merged = theta_base + sum_m weight_m * masked delta_m, optionally with TIES sign
election (mergekit's own helper) and normalisation by the summed weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask

from mergekit_lrp.merging.selection import kept_count, top_k_mask
from mergekit_lrp.merging.tensor_scores import (
    IMPORTANCE_MODES,
    MISSING_SCORES_MODES,
    LRPConfigError,
    importance_of,
    is_protected,
    locate_scores,
)

SHARED_CHOICES = {
    "importance": IMPORTANCE_MODES,
    "consensus": ("none", "sum", "count"),
    "missing_scores": MISSING_SCORES_MODES,
}


def check_shared_parameters(importance: str, consensus: str, missing_scores: str) -> None:
    """Choices, checked here because mergekit's message would not name the option
    (pydantic's literal error names the type, not the parameter)."""
    values = {"importance": importance, "consensus": consensus, "missing_scores": missing_scores}
    for name, value in values.items():
        allowed = SHARED_CHOICES[name]
        if value not in allowed:
            raise LRPConfigError(f"lrp: {name} must be one of {', '.join(allowed)}; got {value!r}")


def check_model_parameters(model: Hashable, weight: float, density: float) -> None:
    """Per-model values, checked here because mergekit's messages would not name the model."""
    if not 0 < density <= 1:
        raise LRPConfigError(f"lrp: density for {model} must be in (0, 1], got {density}")
    if weight < 0:
        raise LRPConfigError(f"lrp: weight for {model} must not be negative, got {weight}")


@merge_method(
    name="lrp",
    pretty_name="LRP (AttnLRP relevance-guided task vectors)",
    reference_url="https://arxiv.org/abs/2402.05602",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lrp_merge(
    group: TensorGroup,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = 0.3,
    lrp_scores: PerNonBase[str | None] = None,
    importance: str = "delta",
    rescale: bool = False,
    consensus: str = "none",
    normalize: bool = False,
    protect_special: bool = True,
    missing_scores: str = "error",
) -> torch.Tensor:
    check_shared_parameters(importance, consensus, missing_scores)
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    protected = protect_special and is_protected(base.ndim, group.metadata.vocabulary_axis)
    deltas, weights = [], []
    for entry in group.non_base:
        check_model_parameters(entry.id, weight[entry.id], density[entry.id])
        delta = entry.tensor - base
        keep = 1.0 if protected else density[entry.id]
        if keep < 1:
            scores = locate_scores(entry.id, name, _lookup(lrp_scores, entry.id), missing_scores)
            imp = importance_of(scores, entry.tensor, delta, importance)
            if imp is None:
                continue
            delta = delta * top_k_mask(imp, kept_count(keep, delta.numel()))
            del imp
            if rescale:
                delta = delta / keep
        deltas.append(delta)
        weights.append(weight[entry.id])
    if not deltas:
        return base

    # The mixing below is the tail of mergekit's GeneralizedTaskArithmeticMerge.merge_group
    # (0.1.5); it is not a function there, so it cannot be called without its sparsifier.
    stacked = torch.stack(deltas)
    del deltas
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * base.ndim))
    stacked.mul_(w)
    if consensus != "none":
        agree = sign_consensus_mask(stacked, method=consensus, mask_dtype=stacked.dtype)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)


def _lookup(values: Mapping[Hashable, str | None], key: Hashable) -> str | None:
    value = values.get(key)
    return str(value) if value else None

"""The ``lrp`` merge method: keep each task vector's most relevant entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (:mod:`.tensor_scores`); a ``density`` fraction of delta_m is kept, by
importance rank, the rest zeroed; then
merged = theta_base + sum_m weight_m * kept delta_m, with the selection, rescaling
and sign rules of :mod:`.combine`, and normalisation by the summed weights.

The defaults (stochastic selection by rank, conflicts to the first-listed model, the
disjoint mean, density 0.9) were chosen on the benchmark's validation split at weight 1
(docs/BENCHMARKS.md, "Choosing lrp's defaults").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.budgets import BUDGETS, budget_density
from mergekit_lrp.merging.combine import (
    CONSENSUS_MODES,
    RESCALE_MODES,
    SELECTION_MODES,
    combine,
    default_epsilon,
    generator_for,
    select,
)
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
    "consensus": CONSENSUS_MODES,
    "missing_scores": MISSING_SCORES_MODES,
    "selection": SELECTION_MODES,
    "budget": BUDGETS,
}


def check_shared_parameters(
    importance: str,
    consensus: str,
    missing_scores: str,
    selection: str = "topk",
    rescale: bool | str = False,
    budget: str = "tensor",
) -> None:
    """Choices, checked here because mergekit's message would not name the option
    (pydantic's literal error names the type, not the parameter)."""
    values = {
        "importance": importance,
        "consensus": consensus,
        "missing_scores": missing_scores,
        "selection": selection,
        "budget": budget,
    }
    for name, value in values.items():
        allowed = SHARED_CHOICES[name]
        if value not in allowed:
            raise LRPConfigError(f"lrp: {name} must be one of {', '.join(allowed)}; got {value!r}")
    if not (isinstance(rescale, bool) or rescale in RESCALE_MODES):
        raise LRPConfigError(f"lrp: rescale must be true, false or mass; got {rescale!r}")


def check_model_parameters(
    model: Hashable, weight: float, density: float, epsilon: float | None = None
) -> None:
    """Per-model values, checked here because mergekit's messages would not name the model.
    ``epsilon`` is checked when the selection is stochastic and it was given."""
    if not 0 < density <= 1:
        raise LRPConfigError(f"lrp: density for {model} must be in (0, 1], got {density}")
    if weight < 0:
        raise LRPConfigError(f"lrp: weight for {model} must not be negative, got {weight}")
    if epsilon is not None and not (
        epsilon >= 0 and density - epsilon > 0 and density + epsilon <= 1
    ):
        raise LRPConfigError(
            f"lrp: with selection: stochastic, density ± epsilon for {model} must stay in "
            f"(0, 1]; got density {density}, epsilon {epsilon}"
        )


@merge_method(
    name="lrp",
    pretty_name="LRP (AttnLRP relevance-guided task vectors)",
    reference_url="https://arxiv.org/abs/2402.05602",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lrp_merge(
    group: TensorGroup,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = 0.9,
    lrp_scores: PerNonBase[str | None] = None,
    importance: str = "delta",
    rescale: bool | str = False,
    consensus: str = "priority",
    normalize: bool = True,
    protect_special: bool = True,
    missing_scores: str = "error",
    selection: str = "stochastic",
    epsilon: float | None = None,
    budget: str = "tensor",
) -> torch.Tensor:
    check_shared_parameters(importance, consensus, missing_scores, selection, rescale, budget)
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    protected = protect_special and is_protected(base.ndim, group.metadata.vocabulary_axis)
    stochastic = selection == "stochastic"
    deltas, importances, weights = [], [], []
    for index, entry in enumerate(group.non_base):
        check_model_parameters(
            entry.id, weight[entry.id], density[entry.id], epsilon if stochastic else None
        )
        delta = entry.tensor - base
        keep = 1.0 if protected else density[entry.id]
        imp = None
        if keep < 1:
            path = _lookup(lrp_scores, entry.id)
            scores = locate_scores(entry.id, name, path, missing_scores)
            imp = importance_of(scores, entry.tensor, delta, importance)
            if imp is None:
                continue
            if path and scores.fallback is None:
                keep = budget_density(path, name, keep, budget)
            generator = generator_for(name, index, delta.device) if stochastic else None
            spread = default_epsilon(keep) if epsilon is None else epsilon
            delta, imp = select(delta, imp, keep, selection, rescale, spread, generator)
        deltas.append(delta)
        importances.append(delta.abs().float() if imp is None else imp)
        weights.append(weight[entry.id])
    if not deltas:
        return base

    stacked = torch.stack(deltas)
    del deltas
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * base.ndim))
    stacked.mul_(w)
    mixed, divisor = combine(stacked, w, torch.stack(importances), consensus)
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)


def _lookup(values: Mapping[Hashable, str | None], key: Hashable) -> str | None:
    value = values.get(key)
    return str(value) if value else None

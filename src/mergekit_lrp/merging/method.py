"""The ``lrp`` merge method: keep each task vector's most important entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (:mod:`.tensor_scores`); a ``density`` fraction of delta_m is kept by
importance rank (:mod:`.selection`), the rest zeroed; the models' weighted kept deltas
are combined by the sign rule of :mod:`.combine`, optionally normalised by the summed
weights, and added to theta_base (docs/method.md).

The defaults (stochastic selection by rank, conflicts to the first-listed model, the
disjoint mean, density 0.9) were chosen on the benchmark's validation split at weight 1
(docs/BENCHMARKS.md, "Choosing lrp's defaults").
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.budgets import budget_density
from mergekit_lrp.merging.combine import combine
from mergekit_lrp.merging.parameters import (
    DEFAULT_DENSITY,
    check_model_parameters,
    check_shared_parameters,
    score_path,
)
from mergekit_lrp.merging.selection import Selection, generator_for
from mergekit_lrp.merging.tensor_names import is_protected
from mergekit_lrp.merging.tensor_scores import importance_of, locate_scores


@merge_method(
    name="lrp",
    pretty_name="LRP (AttnLRP relevance-guided task vectors)",
    reference_url="https://arxiv.org/abs/2402.05602",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lrp_merge(
    group: TensorGroup,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = DEFAULT_DENSITY,
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
    unit_mass: str = "importance",
) -> torch.Tensor:
    check_shared_parameters(
        importance, consensus, missing_scores, selection, rescale, budget, unit_mass=unit_mass
    )
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    protected = protect_special and is_protected(name, base.ndim, group.metadata.vocabulary_axis)
    rule = Selection(selection, epsilon, rescale)
    by_magnitude = consensus == "unit" and unit_mass == "magnitude"
    deltas, importances, magnitudes, weights = [], [], [], []
    for entry in group.non_base:
        check_model_parameters(
            entry.id, weight[entry.id], density[entry.id], epsilon if rule.stochastic else None
        )
        delta = entry.tensor - base
        keep = 1.0 if protected else density[entry.id]
        imp = None
        if keep < 1:
            path = score_path(lrp_scores.get(entry.id))
            scores = locate_scores(entry.id, name, path, missing_scores)
            imp = importance_of(scores, entry.tensor, delta, importance)
            if imp is None:
                continue
            if path and scores.fallback is None:
                keep = budget_density(path, name, keep, budget)
            generator = generator_for(name, entry.id, delta.device) if rule.stochastic else None
            kept, imp = rule.select(delta, imp, keep, generator)
            if by_magnitude:  # the kept entries' own |delta|, before any rescale
                magnitudes.append(delta.abs().float() * (kept != 0))
            delta = kept
        elif by_magnitude:
            magnitudes.append(delta.abs().float())
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
    masses = torch.stack(magnitudes) if by_magnitude else None
    mixed, divisor = combine(stacked, w, torch.stack(importances), consensus, masses, name)
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)

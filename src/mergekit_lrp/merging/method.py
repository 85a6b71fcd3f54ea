"""The ``lrp`` merge method: keep each task vector's most important entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (:mod:`.tensor_scores`); a ``density`` fraction of delta_m is kept by
importance rank (:mod:`.selection`), the rest zeroed; the models' weighted kept deltas
are combined by the sign rule of :mod:`.combine`, optionally normalised by the summed
weights, and added to theta_base (docs/method.md).

The defaults (the top half of each task vector by |theta| x score, the kept deltas added
at weight 1, no sign rule) were chosen on the benchmark's validation split at weight 1,
on two- and four-expert families, by an objective counting the worst expert
(docs/BENCHMARKS.md, "Choosing lrp's defaults").
"""

from __future__ import annotations

import functools

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.budgets import budget_density
from mergekit_lrp.merging.combine import RANKED_CONSENSUS, combine
from mergekit_lrp.merging.parameters import (
    DEFAULT_CONSENSUS,
    DEFAULT_DENSITY,
    DEFAULT_IMPORTANCE,
    DEFAULT_NORMALIZE,
    DEFAULT_SELECTION,
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
    importance: str = DEFAULT_IMPORTANCE,
    rescale: bool | str = False,
    consensus: str = DEFAULT_CONSENSUS,
    normalize: bool = DEFAULT_NORMALIZE,
    protect_special: bool = True,
    missing_scores: str = "error",
    selection: str = DEFAULT_SELECTION,
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
    ranked = consensus in RANKED_CONSENSUS  # the combination reads the kept importances
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
            magnitude = delta.abs().float() if by_magnitude else None  # before any rescale
            delta, imp = rule.select(
                delta, imp, keep, generator, kept_importance=ranked, overwrite=True
            )
            if by_magnitude:  # the kept entries' own |delta|
                magnitudes.append(magnitude.mul_(delta != 0))
        elif by_magnitude:
            magnitudes.append(delta.abs().float())
        if ranked:
            importances.append(delta.abs().float() if imp is None else imp)
        del imp
        deltas.append(delta)
        weights.append(weight[entry.id])
    if not deltas:
        return base

    # weighted in place (each delta is this function's own tensor), in the dtype that
    # stacking them would give; a weight of 1 changes no bit
    dtype = functools.reduce(torch.promote_types, (delta.dtype for delta in deltas))
    for index, (delta, w) in enumerate(zip(deltas, weights, strict=True)):
        delta = delta.to(dtype)
        if w != 1:
            delta.mul_(torch.tensor(w, dtype=dtype, device=delta.device))
        deltas[index] = delta
    mixed, divisor = combine(
        deltas,
        weights,
        importances if ranked else None,
        consensus,
        magnitudes if by_magnitude else None,
        name,
    )
    del deltas, importances, magnitudes
    if normalize:
        mixed = mixed.div_(divisor)
    return mixed.add_(base).to(base.dtype)

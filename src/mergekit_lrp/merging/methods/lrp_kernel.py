"""The ``lrp`` kernel registered with mergekit: :mod:`.lrp` is the method's spec (its
settings and defaults, the per-tensor reading of each task vector this kernel applies,
its checks and card text); this module adds what needs mergekit."""

from __future__ import annotations

import functools

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.combine import RANKED_CONSENSUS, combine
from mergekit_lrp.merging.methods.lrp import (
    DEFAULT_DENSITY,
    DEFAULT_WEIGHT,
    DEFAULTS,
    NAME,
    LrpSettings,
    base_importance,
    held_share,
    plan_tensor,
)
from mergekit_lrp.merging.parameters import score_path
from mergekit_lrp.merging.tensor_scores import locate_scores


@merge_method(
    name=NAME,
    pretty_name="LRP (AttnLRP relevance-guided task vectors)",
    reference_url="https://arxiv.org/abs/2402.05602",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lrp_merge(
    group: TensorGroup,
    weight: PerNonBase[float] = DEFAULT_WEIGHT,
    density: PerNonBase[float] = DEFAULT_DENSITY,
    lrp_scores: PerNonBase[str | None] = None,
    importance: str = DEFAULTS.importance,
    rescale: bool | str = DEFAULTS.rescale,
    consensus: str = DEFAULTS.consensus,
    normalize: bool = DEFAULTS.normalize,
    protect_special: bool = DEFAULTS.protect_special,
    missing_scores: str = DEFAULTS.missing_scores,
    selection: str = DEFAULTS.selection,
    epsilon: float | None = DEFAULTS.epsilon,
    budget: str = DEFAULTS.budget,
    unit_mass: str = DEFAULTS.unit_mass,
    base_scores: str | None = DEFAULTS.base_scores,
    base_weight: float = DEFAULTS.base_weight,
) -> torch.Tensor:
    settings = LrpSettings(
        importance=importance, rescale=rescale, consensus=consensus, normalize=normalize,
        protect_special=protect_special, missing_scores=missing_scores, selection=selection,
        epsilon=epsilon, budget=budget, unit_mass=unit_mass, base_scores=score_path(base_scores),
        base_weight=base_weight,
    )  # fmt: skip
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    rule = settings.rule
    ranked = consensus in RANKED_CONSENSUS  # the combination reads the kept importances
    by_magnitude = consensus == "unit" and unit_mass == "magnitude"
    deltas, importances, magnitudes, weights = [], [], [], []
    holding = settings.base_scores is not None
    kept_mass = None  # with base_scores: the models' kept importance, each over its mean
    for entry in group.non_base:
        settings.check_model(entry.id, weight[entry.id], density[entry.id])
        delta = entry.tensor - base
        path = score_path(lrp_scores.get(entry.id))
        plan = plan_tensor(
            settings,
            entry.id,
            name,
            entry.tensor,
            delta,
            density[entry.id],
            lambda path=path, model=entry.id: locate_scores(model, name, path, missing_scores),
            group.metadata.vocabulary_axis,
        )
        if plan.dropped:
            continue
        imp = plan.importance
        if imp is not None:
            magnitude = delta.abs().float() if by_magnitude else None  # before any rescale
            scale = float(imp.mean()) if holding else 0.0
            delta, imp = rule.select(
                delta, imp, plan.density, plan.generator, kept_importance=ranked or holding,
                overwrite=True,
            )  # fmt: skip
            if holding:
                share = imp / scale if scale > 0 else imp.clone()
                kept_mass = share if kept_mass is None else kept_mass.add_(share)
                imp = imp if ranked else None
            if by_magnitude:  # the kept entries' own |delta|
                magnitudes.append(magnitude.mul_(delta != 0))
        elif by_magnitude:
            magnitudes.append(delta.abs().float())
        if ranked:
            importances.append(delta.abs().float() if imp is None else imp)
        del imp, plan
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
    if kept_mass is not None:  # hold what the base relies on (lrp.held_share)
        held = base_importance(settings, group.base.id, name, base)
        mixed = mixed.mul_(held_share(kept_mass, held, base_weight).to(mixed.dtype))
    return mixed.add_(base).to(base.dtype)

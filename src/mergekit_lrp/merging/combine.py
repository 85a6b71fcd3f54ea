"""How ``lrp`` combines the models' kept entries of one tensor (``consensus``).

On the weighted kept deltas: ``none`` adds them; ``sum`` and ``count`` are TIES' sign
election (mergekit's helper); ``relevance`` elects the sign of the importance-weighted sum;
``winner`` keeps, where kept entries disagree in sign, only the most important one;
``drop`` zeroes such entries; ``priority`` elects the sign of the first-listed model that
kept the entry (Circuit-Merge's conflict rule: where kept entries disagree, the
higher-priority model wins, and the models agreeing with it stay); ``unit`` does what
``priority`` does with a priority per output unit instead of the list order: in each row
of a weight matrix (an output unit), the models are ranked by their mass on that unit
(``unit_mass``: their importance, or their kept |delta|), and an entry's sign is that of
the highest-ranked model that kept it. No model wins because of where it is listed.

With ``normalize``, an entry is divided by the summed weights of the models that
contributed to it (TIES' disjoint mean): agreeing entries averaged, lone entries kept
whole. Importance is compared across models after dividing each model's by its mean over
the tensor (score files of different models need not share a scale).
"""

from __future__ import annotations

import warnings

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask

#: the rules that compare the models' kept importances (the others read signs only)
RANKED_CONSENSUS = ("relevance", "winner", "drop", "unit")


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    importances: list[torch.Tensor] | None,
    consensus: str,
    masses: list[torch.Tensor] | None = None,
    name: str = "<tensor>",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the weighted kept deltas after ``consensus``, summed weights of the entries
    that contributed) for the models' weighted kept ``deltas`` (entries not kept are 0),
    their ``weights`` and, for ``relevance``, ``winner``, ``drop`` and ``unit``, their kept
    ``importances`` (not read otherwise); ``masses`` rank the models per unit for ``unit``
    (default: the importances, each model's divided by its mean). ``priority`` runs model
    by model on the list (no stacked copy); the others on the stacked deltas."""
    if consensus == "priority":
        return _priority(deltas, weights)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * (stacked.ndim - 1)))
    if consensus == "none":
        divisor = w.sum(dim=0).expand(stacked.shape[1:]).clone()
        divisor[divisor.abs() < 1e-8] = 1
        return stacked.sum(dim=0), divisor
    if consensus in ("sum", "count"):
        agree = sign_consensus_mask(stacked, method=consensus, mask_dtype=stacked.dtype).bool()
    elif consensus == "unit":
        ranking = _comparable(torch.stack(importances)) if masses is None else torch.stack(masses)
        agree = _unit_agreement(stacked, _unit_masses(ranking, name))
    else:
        stacked_importances = torch.stack(importances)
        agree = _relevance_agreement(stacked, _comparable(stacked_importances), consensus)
    contributing = agree & (stacked != 0)
    mixed = (stacked * contributing).sum(dim=0)
    divisor = (w * contributing).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, divisor


def _priority(
    deltas: list[torch.Tensor], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``priority``: the elected sign is that of the first model that kept the entry;
    models agreeing with it contribute. Elementwise passes over the models, summed in
    model order from 0 as a sum along the model axis would (the same bits), without
    stacking the models (a reduction along the model axis is much slower on CPU); the
    deltas are overwritten.

    An entry no model kept (all 0) elects no sign (0), and every model "agrees": it adds
    its 0 to the sum and its weight to the divisor, which changes no bit of the merge
    (0 divided by any divisor) and saves checking that each delta is nonzero."""
    signs = [torch.sign(delta) for delta in deltas]
    elected = signs[0]
    for sign in signs[1:]:
        elected = torch.where(elected == 0, sign, elected)
    dtype = deltas[0].dtype
    # a sum along an axis accumulates 16-bit floats in float32 and rounds once: so here
    accumulate = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    mixed = torch.zeros_like(deltas[0], dtype=accumulate)
    divisor = torch.zeros_like(deltas[0], dtype=accumulate)
    for delta, sign, weight in zip(deltas, signs, weights, strict=True):
        contributing = sign.eq_(elected) if sign is not elected else sign == elected
        mixed.add_(delta.mul_(contributing))
        divisor.add_(contributing, alpha=float(torch.tensor(weight, dtype=dtype)))
    divisor[divisor == 0] = 1
    return mixed.to(dtype), divisor.to(dtype)


def _comparable(importances: torch.Tensor) -> torch.Tensor:
    """Each model's importance divided by its mean over the tensor."""
    dims = tuple(range(1, importances.ndim))
    mean = importances.float().mean(dim=dims, keepdim=True)
    return importances.float() / torch.where(mean > 0, mean, torch.ones_like(mean))


#: reasons already reported in this process (one warning each, not one per tensor)
_REPORTED: set[str] = set()


def _unit_masses(masses: torch.Tensor, name: str) -> torch.Tensor:
    """Each model's mass on each output unit (a row of a weight matrix: all dimensions but
    the first summed), broadcast back to the entries. A 1-D tensor (a norm, a bias) or a
    fused layout of more than two dimensions has no output units defined here: there each
    entry is its own unit, said once per process."""
    if masses.ndim == 3:  # [models, rows, columns]
        return masses.sum(dim=2, keepdim=True).expand_as(masses)
    reason = "1-D tensors (norms, biases)" if masses.ndim == 2 else "fused tensors of 3+ dims"
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        warnings.warn(
            f"lrp: consensus: unit on {name!r}: {reason} have no output units; their sign "
            "conflicts go, entry by entry, to the model of larger mass (as consensus: winner "
            "ranks, keeping the models that agree with it)",
            stacklevel=2,
        )
    return masses


def _unit_agreement(stacked: torch.Tensor, unit_masses: torch.Tensor) -> torch.Tensor:
    """Kept entries with the sign of the kept entry whose model has the largest mass on
    the entry's unit (the first such model on ties)."""
    kept = stacked != 0
    key = torch.where(kept, unit_masses.float(), torch.full_like(unit_masses.float(), -1.0))
    signs = torch.sign(stacked)
    best, elected = key[0], signs[0]
    for index in range(1, stacked.shape[0]):
        better = key[index] > best
        best = torch.where(better, key[index], best)
        elected = torch.where(better, signs[index], elected)
    return kept & (signs == elected)


def _relevance_agreement(stacked, importances, consensus) -> torch.Tensor:
    kept = stacked != 0
    if consensus == "relevance":
        elected = torch.sign((importances * stacked.float()).sum(dim=0))
        return kept & (torch.sign(stacked) == elected)
    conflict = (stacked > 0).any(dim=0) & (stacked < 0).any(dim=0)
    if consensus == "drop":
        return kept & ~conflict
    ranked = torch.where(kept, importances, torch.full_like(importances, -1.0))
    best = ranked[0]
    first_best = torch.zeros(ranked.shape[1:], dtype=torch.long, device=ranked.device)
    for index in range(1, ranked.shape[0]):  # the first model with the highest importance
        better = ranked[index] > best
        best = torch.where(better, ranked[index], best)
        first_best = torch.where(better, index, first_best)
    winner = first_best.unsqueeze(0) == torch.arange(ranked.shape[0], device=ranked.device).reshape(
        -1, *([1] * (ranked.ndim - 1))
    )
    return kept & torch.where(conflict, winner, torch.ones_like(kept))

"""How ``lrp`` combines the models' kept entries of one tensor (``consensus``).

On the weighted kept deltas: ``none`` adds them; ``sum`` and ``count`` are TIES' sign
election (mergekit's helper); ``relevance`` elects the sign of the importance-weighted sum;
``winner`` keeps, where kept entries disagree in sign, only the most important one;
``drop`` zeroes such entries; ``priority`` elects the sign of the first-listed model that
kept the entry (Circuit-Merge's conflict rule: where kept entries disagree, the
higher-priority model wins, and the models agreeing with it stay). With ``normalize``, an
entry is divided by the summed weights of the models that contributed to it (TIES'
disjoint mean): agreeing entries averaged, lone entries kept whole. Importance is
compared across models after dividing each model's by its mean over the tensor (score
files of different models need not share a scale).
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask

#: the rules that compare the models' kept importances (the others read signs only)
RANKED_CONSENSUS = ("relevance", "winner", "drop")


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    importances: list[torch.Tensor] | None,
    consensus: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the weighted kept deltas after ``consensus``, summed weights of the entries
    that contributed) for the models' weighted kept ``deltas`` (entries not kept are 0),
    their ``weights`` and, for ``relevance``, ``winner`` and ``drop``, their kept
    ``importances`` (not read otherwise). ``priority`` runs model by model on the list
    (no stacked copy); the others on the stacked deltas."""
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

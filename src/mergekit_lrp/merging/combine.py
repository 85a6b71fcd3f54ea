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


def combine(
    stacked: torch.Tensor, weights: torch.Tensor, importances: torch.Tensor, consensus: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the weighted kept deltas after ``consensus``, summed weights of the entries
    that contributed) for ``stacked`` [models, ...] and ``importances`` of the same shape."""
    if consensus == "none":
        divisor = weights.sum(dim=0).expand(stacked.shape[1:]).clone()
        divisor[divisor.abs() < 1e-8] = 1
        return stacked.sum(dim=0), divisor
    if consensus in ("sum", "count"):
        agree = sign_consensus_mask(stacked, method=consensus, mask_dtype=stacked.dtype).bool()
    elif consensus == "priority":
        agree = _priority_agreement(stacked)
    else:
        agree = _relevance_agreement(stacked, _comparable(importances), consensus)
    contributing = agree & (stacked != 0)
    mixed = (stacked * contributing).sum(dim=0)
    divisor = (weights * contributing).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed, divisor


def _comparable(importances: torch.Tensor) -> torch.Tensor:
    """Each model's importance divided by its mean over the tensor."""
    dims = tuple(range(1, importances.ndim))
    mean = importances.float().mean(dim=dims, keepdim=True)
    return importances.float() / torch.where(mean > 0, mean, torch.ones_like(mean))


def _priority_agreement(stacked) -> torch.Tensor:
    """Kept entries with the sign of the first model that kept the entry (elementwise
    passes over the models: a reduction along the model axis is much slower on CPU)."""
    signs = torch.sign(stacked)
    elected = signs[0].clone()
    for sign in signs[1:]:
        elected = torch.where(elected == 0, sign, elected)
    return (stacked != 0) & (signs == elected)


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

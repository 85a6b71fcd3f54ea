"""How ``lrp`` keeps entries of one task vector and combines the models' kept entries.

Selection (per model, per tensor):

* ``topk``: exactly round(density * n) entries of highest importance;
* ``stochastic`` (DELLA-style, by importance rank): entry i is kept with probability
  p_i = density - epsilon + 2 * epsilon * rank_i / (n - 1), rank 0 the least important, and
  divided by p_i, so the expected kept delta is the delta; seeded from mergekit's
  ``--random-seed``, the tensor name and the model's position, so it does not depend on
  the order tensors are merged in.

Rescaling the top-k (``rescale``): ``true`` divides by density, as DARE does for random
drops; ``mass`` divides by the kept share of importance mass, sum(kept importance) /
sum(importance), which is larger than density when the kept entries are the important
ones, so it overshoots less.

Combining (``consensus``), on the weighted kept deltas: ``none`` adds them; ``sum`` and
``count`` are TIES' sign election (mergekit's helper); ``relevance`` elects the sign of the
importance-weighted sum; ``winner`` keeps, where kept entries disagree in sign, only the
most important one; ``drop`` zeroes such entries; ``priority`` elects the sign of the
first-listed model that kept the entry (Circuit-Merge's conflict rule: where kept entries
disagree, the higher-priority model wins, and the models agreeing with it stay). With
``normalize``, an entry is divided by the summed weights of the models that contributed to
it (TIES' disjoint mean): agreeing entries averaged, lone entries kept whole. Importance
is compared across models after dividing each model's by its mean over the tensor (score
files of different models need not share a scale).
"""

from __future__ import annotations

import zlib

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask

from mergekit_lrp.merging.selection import kept_count, top_k_mask

CONSENSUS_MODES = ("none", "sum", "count", "relevance", "winner", "drop", "priority")
SELECTION_MODES = ("topk", "stochastic")
RESCALE_MODES = (False, True, "mass")


def select(
    delta: torch.Tensor,
    importance: torch.Tensor,
    density: float,
    selection: str = "topk",
    rescale: bool | str = False,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept and rescaled delta, importance of the kept entries, 0 elsewhere)."""
    if selection == "stochastic":
        # a budget may move a tensor's density to within epsilon of 0 or 1
        probability = keep_probabilities(importance, density, epsilon).clamp(1e-6, 1.0)
        mask = torch.bernoulli(probability, generator=generator).bool()
        return delta * mask / probability, importance * mask
    mask = top_k_mask(importance, kept_count(density, delta.numel()))
    kept = delta * mask
    if rescale is True:
        kept = kept / density
    elif rescale == "mass":
        total = importance.sum()
        share = (importance * mask).sum() / total if total > 0 else density
        kept = kept / max(float(share), 1e-12)
    return kept, importance * mask


def default_epsilon(density: float) -> float:
    """The spread of stochastic keep probabilities when ``epsilon`` is not given:
    0.1, narrowed near 0 and 1 so that density ± epsilon stays inside [density/2, 1]."""
    return max(0.0, min(0.1, density / 2, (1 - density) / 2))


def keep_probabilities(importance: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """density - epsilon for the least important entry rising linearly to density + epsilon
    for the most important one (ties in index order); mean density."""
    n = importance.numel()
    if epsilon == 0:  # one probability for every entry: no ranking needed
        return torch.full_like(importance, density, dtype=torch.float32)
    # importance is >= 0 (and + 0.0 turns -0.0 into 0.0), so its float32 bits order like
    # its values: sorting them as int32 gives the same ranks, faster than a float sort
    bits = (importance.reshape(-1).float() + 0.0).view(torch.int32)
    order = torch.argsort(bits, stable=True)
    ranks = torch.arange(n, dtype=torch.float32, device=importance.device)
    spread = ranks.div_(n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    by_rank = spread.mul_(2 * epsilon).add_(density - epsilon)  # computed in rank order,
    probability = torch.empty_like(by_rank)  # then put back in place: one scatter
    probability[order] = by_rank
    return probability.reshape(importance.shape)


def generator_for(name: str, index: int, device) -> torch.Generator:
    """A generator seeded by mergekit's random seed, the tensor and the model's position."""
    seed = (torch.initial_seed() + 1_000_003 * zlib.crc32(f"{name}\0{index}".encode())) % 2**63
    return torch.Generator(device=device).manual_seed(seed)


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

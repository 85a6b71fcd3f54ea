"""Which entries of one model's task vector a merge keeps: every selection rule, without
mergekit, so that the merge, the notebook API and ``lrp-inspect`` draw the same masks.

* ``topk``: exactly round(density * n) entries of highest importance (a selection,
  ``kthvalue``, not a sort; ties at the threshold kept in index order);
* ``stochastic`` (DELLA-style, by importance rank): entry i is kept with probability
  p_i = density - epsilon + 2 * epsilon * rank_i / (n - 1), rank 0 the least important,
  and divided by p_i, so the expected kept delta is the delta. The draw is seeded by
  mergekit's ``--random-seed`` (torch's initial seed), the tensor's name and the model
  (:func:`generator_for`), so it depends neither on the order the models are listed in
  nor on the order the tensors are merged in.

Rescaling the top-k (``rescale``): ``true`` divides by density, as DARE does for random
drops; ``mass`` divides by the kept share of importance mass, sum(kept importance) /
sum(importance), which is larger than density when the kept entries are the important
ones, so it overshoots less.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch


def kept_count(density: float, numel: int) -> int:
    """k = round(density * numel): the number of entries a density keeps."""
    return int(round(density * numel))


def top_k_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly ``k`` entries of highest importance.

    The threshold comes from a selection (``kthvalue``), not a sort. Entries tied
    at the threshold are kept in flat-index order, so the mask is deterministic.
    """
    flat = importance.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(importance, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(importance, dtype=torch.bool)
    threshold = torch.kthvalue(flat.float(), n - k + 1).values.to(flat.dtype)
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[tied] = True
    return mask.reshape(importance.shape)


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


def model_key(model) -> str:
    """What identifies a model in the seeding of its draws: its reference as the merge
    config writes it (a path, a hub id, ``base+adapter``), a local path made absolute so
    that ``./ft`` and ``ft`` are the same model."""
    text = str(model)
    return os.path.realpath(text) if os.path.exists(text) else text


def generator_for(name: str, model: str, device, seed: int | None = None) -> torch.Generator:
    """The generator of one model's draw for one tensor: seeded by ``seed`` (default:
    torch's initial seed, which mergekit's ``--random-seed`` sets), the tensor's name and
    the model (:func:`model_key`), so a model's draw does not depend on where it is listed
    or in which order the tensors are merged."""
    seed = torch.initial_seed() if seed is None else seed
    seed = (seed + 1_000_003 * zlib.crc32(f"{name}\0{model_key(model)}".encode())) % 2**63
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True)
class Selection:
    """How one model's entries are chosen: ``selection``, ``epsilon`` (stochastic; None =
    :func:`default_epsilon` of the tensor's density) and ``rescale`` (top-k)."""

    selection: str = "stochastic"
    epsilon: float | None = None
    rescale: bool | str = False

    @property
    def stochastic(self) -> bool:
        return self.selection == "stochastic"

    def spread(self, density: float) -> float:
        return default_epsilon(density) if self.epsilon is None else self.epsilon

    def mask(
        self, importance: torch.Tensor, density: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(kept entries, their keep probabilities or None for top-k)."""
        if self.stochastic:
            # a budget may move a tensor's density to within epsilon of 0 or 1
            probability = keep_probabilities(importance, density, self.spread(density))
            probability = probability.clamp(1e-6, 1.0)
            return torch.bernoulli(probability, generator=generator).bool(), probability
        return top_k_mask(importance, kept_count(density, importance.numel())), None

    def select(
        self,
        delta: torch.Tensor,
        importance: torch.Tensor,
        density: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept and rescaled delta, importance of the kept entries, 0 elsewhere)."""
        mask, probability = self.mask(importance, density, generator)
        if probability is not None:
            return delta * mask / probability, importance * mask
        kept = delta * mask
        if self.rescale is True:
            kept = kept / density
        elif self.rescale == "mass":
            total = importance.sum()
            share = (importance * mask).sum() / total if total > 0 else density
            kept = kept / max(float(share), 1e-12)
        return kept, importance * mask

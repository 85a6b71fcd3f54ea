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

Ranks (:func:`keep_probabilities`) are exact below :data:`EXACT_RANKS_BELOW` entries (a
sort; ties in index order) and approximate from that size on: a histogram of the
importances' float32 bit patterns gives each entry's rank to within the count of its bin,
in a few linear passes instead of a sort. **The bound:** with exact ranks r_i (ties in
index order, as below the threshold), every entry's keep probability is within
:data:`RANK_TOLERANCE` (0.002) of the exact one, |p_i - p_exact_i| <= 0.002, except
entries whose importance value is shared by more than 1 + 0.002 * (n - 1) / epsilon
entries: such a tie group, which the exact version orders arbitrarily (by index), gets
one probability, the mean of its exact ones. Entries whose delta is exactly 0 contribute
nothing whatever their probability (with ``importance: delta`` they are the tie at
importance 0).

Rescaling the top-k (``rescale``): ``true`` divides by density, as DARE does for random
drops; ``mass`` divides by the kept share of importance mass, sum(kept importance) /
sum(importance), which is larger than density when the kept entries are the important
ones, so it overshoots less.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from dataclasses import dataclass

import torch

#: tensors with fewer entries get exact ranks (a sort); larger ones the histogram's
EXACT_RANKS_BELOW = 2**16
#: the threshold in force (:func:`exact_ranks` lifts it for a block)
_exact_below = [EXACT_RANKS_BELOW]
#: the most an approximate rank moves an entry's keep probability (ties aside)
RANK_TOLERANCE = 0.002
#: bins of the first histogram (2 ** bits over the tensor's range of float32 patterns),
#: and the bits by which each later one splits the bins still too full
_FIRST_BITS = 16
_NEXT_BITS = 8


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
    """density - epsilon for the least important entry rising linearly with its rank to
    density + epsilon for the most important one; mean density. Exact ranks (ties in index
    order) below :data:`EXACT_RANKS_BELOW` entries, else within the module's bound.
    ``importance`` must be >= 0 (it is: scores are checked, magnitudes are)."""
    n = importance.numel()
    if epsilon == 0:  # one probability for every entry: no ranking needed
        return torch.full_like(importance, density, dtype=torch.float32)
    if n < _exact_below[0]:
        return exact_keep_probabilities(importance, density, epsilon)
    return _histogram_keep_probabilities(importance, density, epsilon)


@contextlib.contextmanager
def exact_ranks(on: bool = True):
    """While ``on``, every tensor is ranked exactly (a sort), whatever its size: the
    reference the approximate ranks are measured against (docs/method.md)."""
    saved = _exact_below[0]
    if on:
        _exact_below[0] = sys.maxsize
    try:
        yield
    finally:
        _exact_below[0] = saved


def exact_keep_probabilities(
    importance: torch.Tensor, density: float, epsilon: float
) -> torch.Tensor:
    """:func:`keep_probabilities` from exact ranks at any size (one sort; ties in index
    order): the reference the approximate ranks are measured against."""
    n = importance.numel()
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


def _histogram_keep_probabilities(
    importance: torch.Tensor, density: float, epsilon: float
) -> torch.Tensor:
    """Keep probabilities from ranks read off a histogram of the float32 bit patterns.

    Non-negative float32 values order like their bit patterns read as integers, and a
    bin of consecutive patterns holds an interval of values: an entry's exact rank lies
    between the count of the bins below its own and that plus its bin's count minus 1.
    Each entry gets its bin's middle rank, off by at most (count - 1) / 2, which moves p
    by at most epsilon * (count - 1) / (n - 1). The first histogram has
    2 ** :data:`_FIRST_BITS` bins over the tensor's range of patterns; bins holding more
    entries than RANK_TOLERANCE allows are split by the next :data:`_NEXT_BITS` bits of
    the pattern, down to the last bit, where a bin still too full holds one value (a tie)
    whose entries share its middle rank.
    """
    flat = importance.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    bits = flat.contiguous().view(torch.int32)
    low, high = (int(v) for v in torch.aminmax(bits))
    if low < 0:  # -0.0 (sign bit set; the only negative pattern of a value >= 0) as 0.0
        bits = (flat + 0.0).view(torch.int32)
        low, high = (int(v) for v in torch.aminmax(bits))
    n = bits.numel()
    limit = 1 + int(RANK_TOLERANCE * (n - 1) / epsilon)  # the most entries a bin may hold
    scale, offset = 2 * epsilon / (n - 1), density - epsilon
    shift = max(0, (high - low).bit_length() - _FIRST_BITS)
    key = bits - low
    key.bitwise_right_shift_(shift)
    counts = torch.bincount(key, minlength=((high - low) >> shift) + 1)
    below = torch.cumsum(counts, dim=0).sub_(counts)
    probability = _bin_probabilities(below, counts, scale, offset).index_select(0, key)
    entries = None  # the entries of bins too full, in the order of their bins' ranks
    while shift > 0:
        full = counts > limit
        if not bool(full.any()):
            break
        chosen = torch.nonzero(full.index_select(0, key)).squeeze(1)
        entries = chosen if entries is None else entries.index_select(0, chosen)
        group = torch.cumsum(full, dim=0).sub_(1).index_select(0, key.index_select(0, chosen))
        starts = below[full]
        width = min(_NEXT_BITS, shift)
        shift -= width
        key = bits.index_select(0, entries).sub_(low)  # the next bits, within each group
        key.bitwise_right_shift_(shift).bitwise_and_((1 << width) - 1)
        key.add_(group.to(torch.int32) << width)
        counts = torch.bincount(key, minlength=len(starts) << width)
        grouped = counts.reshape(len(starts), -1)
        below = torch.cumsum(grouped, dim=1).sub_(grouped).add_(starts[:, None]).reshape(-1)
        table = _bin_probabilities(below, counts, scale, offset)
        probability.index_copy_(0, entries, table.index_select(0, key))
    return probability.reshape(importance.shape)


def _bin_probabilities(below, counts, scale: float, offset: float) -> torch.Tensor:
    """The keep probability of each bin's middle rank, below + (count - 1) / 2."""
    middle = counts.double().sub_(1).div_(2).add_(below)
    return middle.mul_(scale).add_(offset).float()


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


def draw(probability: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask, True with ``probability`` per entry: one uniform number per entry
    (on CPU the same mask as ``torch.bernoulli(probability, generator)``, cheaper)."""
    uniform = torch.rand(
        probability.shape, generator=generator, device=probability.device, dtype=torch.float32
    )
    return uniform < probability


@dataclass(frozen=True)
class Selection:
    """How one model's entries are chosen: ``selection``, ``epsilon`` (stochastic; None =
    :func:`default_epsilon` of the tensor's density) and ``rescale`` (top-k)."""

    selection: str
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
            probability = probability.clamp_(1e-6, 1.0)
            return draw(probability, generator), probability
        return top_k_mask(importance, kept_count(density, importance.numel())), None

    def select(
        self,
        delta: torch.Tensor,
        importance: torch.Tensor,
        density: float,
        generator: torch.Generator | None = None,
        kept_importance: bool = True,
        overwrite: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(kept and rescaled delta, importance of the kept entries and 0 elsewhere, or
        None unless ``kept_importance``). With ``overwrite`` the kept delta is written
        into ``delta`` where its dtype allows (the merge kernel's own tensor)."""
        mask, probability = self.mask(importance, density, generator)
        kept_imp = importance * mask if kept_importance else None
        if probability is not None:
            # in place unless the division promotes (a bfloat16 delta: float32, as before)
            if delta.dtype == probability.dtype:
                kept = delta.mul_(mask) if overwrite else delta * mask
                return kept.div_(probability), kept_imp
            return delta * mask / probability, kept_imp
        kept = delta * mask
        if self.rescale is True:
            kept = kept / density
        elif self.rescale == "mass":
            total = importance.sum()
            share = (importance * mask).sum() / total if total > 0 else density
            kept = kept / max(float(share), 1e-12)
        return kept, kept_imp

"""Gram sums over several processes in the factored form (``--gram-form factored``).

Summing dense [n, n] matrices moves n^2 values per matrix between processes however
few directions the calibration tokens span. Here each process factors its own sums
(:func:`~mergekit_lrp.scores.gram_forms.factor_gram`, at ``tolerance / (2 P)`` for P
processes), the processes gather the factors and sum the exact diagonals, and the first
process combines them to the requested tolerance
(:func:`~mergekit_lrp.scores.gram_forms.combine_factored`), so (n + 1) r values per
process cross. The recorded bound adds every process's residual to the combination's.
A matrix that some process cannot store smaller, or whose combination is not smaller
than dense, is summed dense as the other signals' sums are.

Each process still holds its own dense float32 sums while it scores its prompts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergekit_lrp.scores.gram_forms import Factored, combine_factored, factor_gram
from mergekit_lrp.scoring.distributed import Workers


def reduce_factored(
    sums: Mapping[str, torch.Tensor],
    workers: Workers,
    device,
    tolerance: float,
    max_rank: int | None,
) -> dict[str, torch.Tensor | Factored]:
    """Each Gram sum over all processes: factored (on the first process; the others get
    their own part) or, where the factored form does not pay, the dense sum."""
    import torch.distributed as dist

    where = workers.tensor_device(device)
    names = sorted(sums)  # same order in every process
    part_tolerance = tolerance / (2 * workers.world_size)
    parts = {name: factor_gram((sums[name] + sums[name].T) / 2, part_tolerance, max_rank)
             for name in names}  # fmt: skip
    cannot = torch.tensor([parts[name] is None for name in names], dtype=torch.int64, device=where)
    dist.all_reduce(cannot, op=dist.ReduceOp.MAX)
    dense = [name for name, flag in zip(names, cannot.tolist(), strict=True) if flag]
    out: dict[str, torch.Tensor | Factored] = {}
    not_smaller = []
    for name in names:
        if name in dense:
            continue
        gathered = _gather(parts[name], workers, where)
        diagonal = sums[name].diagonal().to(where, torch.float64)
        dist.all_reduce(diagonal)
        if workers.is_main:
            form = combine_factored(gathered, diagonal, tolerance, max_rank)
            if form is None:
                not_smaller.append(name)
            else:
                out[name] = Factored(
                    form.factor.cpu(), form.diagonal.cpu(), form.error, form.estimated
                )
    decided = [not_smaller]
    dist.broadcast_object_list(decided, src=0)
    dense += decided[0]
    workers.sum_tensors({name: sums[name] for name in dense}, device)
    out.update({name: sums[name] for name in dense})
    return out


def mean_forms(
    reduced: Mapping[str, torch.Tensor | Factored], count: int
) -> dict[str, torch.Tensor | Factored]:
    """The mean over ``count`` prompts of each reduced sum (dense ones made exactly
    symmetric, as a single process's are)."""
    out: dict[str, torch.Tensor | Factored] = {}
    for name, value in reduced.items():
        if isinstance(value, Factored):
            factor, diagonal = value.factor / count**0.5, value.diagonal / count
            out[name] = Factored(factor, diagonal, value.error, value.estimated)
        else:
            mean = value / count
            out[name] = (mean + mean.T) / 2
    return out


def _gather(part: Factored, workers: Workers, where: torch.device) -> list[Factored]:
    """Every process's factored part (factors padded to the widest rank to travel)."""
    import torch.distributed as dist

    size = workers.world_size
    rank = torch.tensor([part.factor.shape[1]], dtype=torch.int64, device=where)
    ranks = [torch.zeros_like(rank) for _ in range(size)]
    dist.all_gather(ranks, rank)
    widest = max(int(value) for value in ranks)
    n = part.factor.shape[0]
    padded = torch.zeros(n, widest, dtype=torch.float32, device=where)
    padded[:, : part.factor.shape[1]] = part.factor.to(where)
    factors = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(factors, padded)
    error = torch.tensor([part.error], dtype=torch.float64, device=where)
    errors = [torch.empty_like(error) for _ in range(size)]
    dist.all_gather(errors, error)
    return [
        Factored(factor[:, : int(width)], part.diagonal, float(err), part.estimated)
        for factor, width, err in zip(factors, ranks, errors, strict=True)
    ]

"""How a Gram matrix is stored: dense, or factored as low rank plus its exact diagonal.

A Gram matrix G = sum_t w_t x_t x_t^T of T calibration tokens has rank at most T, and the
inputs of a language model's layers concentrate in a few directions, so most of an
[n, n] matrix restates a few hundred or thousand vectors. The factored form keeps the r
leading eigenpairs (lambda_k, v_k) of G and its diagonal exactly:

    G ~ F F^T + diag(d),   F = [sqrt(lambda_1) v_1, ..., sqrt(lambda_r) v_r],
                           d = diag(G) - diag(F F^T) >= 0

which is positive semi-definite, equal to G on the diagonal (RegMean's diagonal term and
the ``activation`` signal read it unchanged), and exact when G has rank r. The rest of G,
R = sum_{k>r} lambda_k v_k v_k^T, is replaced by its diagonal, so
||G - G~||_2 = ||R - diag(R)||_2 <= 2 lambda_{r+1}: the stored ``error`` is that bound
relative to ||G||_2 = lambda_1.

The rank of each matrix is the fewest leading eigenpairs whose bound meets the tolerance,
capped at ``max_rank``; a matrix whose factors would hold as many values as the dense
matrix is stored dense. Storage is (n + 1) r + n values instead of n^2 (the symmetric
matrix written whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR, DIAGONAL = ".factor", ".diagonal"
#: the default relative error bound of a factored Gram matrix (lrp-compute
#: --gram-tolerance): docs/scaling.md measures what it keeps of a merge
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Factored:
    """One factored Gram matrix: ``factor`` [n, r], ``diagonal`` [n], and the bound
    ``error`` on ||G - G~||_2 / ||G||_2."""

    factor: torch.Tensor
    diagonal: torch.Tensor
    error: float

    def dense(self) -> torch.Tensor:
        """G~ = F F^T + diag(d), float32."""
        factor = self.factor.float()
        out = factor @ factor.T
        out.diagonal().add_(self.diagonal.float())
        return out


def factor_gram(gram: torch.Tensor, tolerance: float, max_rank: int | None) -> Factored | None:
    """The factored form of ``gram`` (symmetric, float32) meeting ``tolerance`` with at
    most ``max_rank`` eigenpairs, or None when it would not be smaller than the matrix.

    The eigendecomposition runs in float64 on the matrix's device (n^3 operations)."""
    n = gram.shape[0]
    limit = n - 2 if max_rank is None else min(max_rank, n - 2)  # (n + 1) r + n < n^2
    if limit < 1:
        return None
    values, vectors = torch.linalg.eigh(gram.double())
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    top = float(values[0])
    if top == 0:
        return None
    # the bound 2 lambda_{r+1} / lambda_1 of each rank r = 0..n-1
    bounds = 2 * values / top
    meeting = torch.nonzero(bounds <= tolerance)
    rank = int(meeting[0]) if len(meeting) else n
    if rank > limit:
        if max_rank is None or max_rank >= n - 2:
            return None
        rank = limit
    rank = max(rank, 1)
    factor = vectors[:, :rank] * values[:rank].sqrt()
    diagonal = (gram.double().diagonal() - factor.square().sum(dim=1)).clamp_min(0)
    return Factored(factor.float(), diagonal.float(), float(bounds[rank]))  # rank <= n - 2


def stored_names(name: str) -> tuple[str, str]:
    """The two tensors of factored Gram matrix ``name``."""
    return name + FACTOR, name + DIAGONAL


def factored_tensors(
    grams: dict[str, torch.Tensor], tolerance: float, max_rank: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the tensors to store, the ``gram_factored`` metadata) for Gram matrices ``grams``
    (stored name -> matrix): each factored where that is smaller, else whole."""
    tensors, factored = {}, {}
    for name, gram in grams.items():
        form = factor_gram(gram, tolerance, max_rank)
        if form is None:
            tensors[name] = gram
            continue
        factor, diagonal = stored_names(name)
        tensors[factor], tensors[diagonal] = form.factor, form.diagonal
        factored[name] = {"rank": form.factor.shape[1], "error": form.error}
    return tensors, factored

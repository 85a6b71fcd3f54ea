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
capped at ``max_rank`` (a cap far below the width computes only the leading eigenpairs,
and the error recorded is then estimated: :func:`_factor_leading`); a matrix whose
factors would hold as many values as the dense matrix is stored dense. Storage is
(n + 1) r + n values instead of n^2 (the symmetric matrix written whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR, DIAGONAL = ".factor", ".diagonal"
#: the default relative error bound of a factored Gram matrix (lrp-compute
#: --gram-tolerance): docs/scaling.md measures what it keeps of a merge
DEFAULT_TOLERANCE = 1e-3
#: a rank cap of at most this share of the width computes only the leading eigenpairs
#: (:func:`_factor_leading`) instead of the whole spectrum
LEADING_SHARE = 1 / 8
#: the leading eigenpairs' subspace iteration: extra columns, and power steps
OVERSAMPLING, POWER_STEPS = 16, 2
#: power iterations estimating the error of a matrix factored that way
ERROR_STEPS = 30


@dataclass(frozen=True)
class Factored:
    """One factored Gram matrix: ``factor`` [n, r], ``diagonal`` [n], and the bound
    ``error`` on ||G - G~||_2 / ||G||_2."""

    factor: torch.Tensor
    diagonal: torch.Tensor
    error: float
    #: the error is estimated (power iteration), not bounded: leading eigenpairs only
    estimated: bool = False

    def dense(self) -> torch.Tensor:
        """G~ = F F^T + diag(d), float32."""
        factor = self.factor.float()
        out = factor @ factor.T
        out.diagonal().add_(self.diagonal.float())
        return out


def factor_gram(gram: torch.Tensor, tolerance: float, max_rank: int | None) -> Factored | None:
    """The factored form of ``gram`` (symmetric, float32) meeting ``tolerance`` with at
    most ``max_rank`` eigenpairs, or None when it would not be smaller than the matrix.

    The eigendecomposition runs in float64 on the matrix's device (n^3 operations); under
    a cap of at most :data:`LEADING_SHARE` of the width, only the leading eigenpairs are
    computed (n^2 k operations, :func:`_factor_leading`)."""
    if max_rank is not None and max_rank <= gram.shape[0] * LEADING_SHARE:
        return _factor_leading(gram, tolerance, max_rank)
    values, vectors = _descending(*torch.linalg.eigh(gram.double()))
    chosen = _rank(values, tolerance, gram.shape[0], max_rank)
    if chosen is None:
        return None
    rank, bound = chosen
    factor = vectors[:, :rank] * values[:rank].sqrt()
    diagonal = (gram.double().diagonal() - factor.square().sum(dim=1)).clamp_min(0)
    return Factored(factor.float(), diagonal.float(), bound)


def _factor_leading(gram: torch.Tensor, tolerance: float, max_rank: int) -> Factored | None:
    """The factored form from the leading k = max_rank + oversampling eigenpairs, by
    randomized subspace iteration (Halko, Martinsson & Tropp 2011, algorithm 4.4, seeded):
    (2 + 2 POWER_STEPS) n^2 k operations instead of the whole spectrum's ~9 n^3, which at
    70B widths is an hour a matrix on a CPU. Ritz values approximate the eigenvalues from
    below, so the 2 lambda_{r+1} bound no longer holds exactly: the recorded error is the
    larger of it and ||G - G~||_2 measured by power iteration, and marked estimated."""
    g = gram.double()
    n = g.shape[0]
    k = min(n, max_rank + max(OVERSAMPLING, max_rank // 8))
    generator = torch.Generator(device=g.device).manual_seed(0)
    start = torch.randn(n, k, generator=generator, dtype=g.dtype, device=g.device)
    basis = torch.linalg.qr(g @ start).Q
    for _ in range(POWER_STEPS):
        basis = torch.linalg.qr(g @ basis).Q
    projected = basis.T @ (g @ basis)
    values, vectors = _descending(*torch.linalg.eigh((projected + projected.T) / 2))
    chosen = _rank(values, tolerance, n, max_rank)
    if chosen is None:
        return None
    rank, bound = chosen
    factor = (basis @ vectors[:, :rank]) * values[:rank].sqrt()
    diagonal = (g.diagonal() - factor.square().sum(dim=1)).clamp_min(0)
    measured = _residual_norm(g, factor, diagonal, generator) / float(values[0])
    return Factored(factor.float(), diagonal.float(), max(measured, bound), estimated=True)


def _residual_norm(g, factor, diagonal, generator) -> float:
    """||G - F F^T - diag(d)||_2 by power iteration (a symmetric matrix: its largest
    |eigenvalue|), n^2 operations a step."""
    x = torch.randn(g.shape[0], generator=generator, dtype=g.dtype, device=g.device)
    x /= x.norm()
    norm = 0.0
    for _ in range(ERROR_STEPS):
        y = g @ x - factor @ (factor.T @ x) - diagonal * x
        norm = float(y.norm())
        if norm == 0:
            return 0.0
        x = y / norm
    return norm


def combine_factored(
    parts: list[Factored], diagonal: torch.Tensor, tolerance: float, max_rank: int | None
) -> Factored | None:
    """The factored form of the sum of the matrices ``parts`` were factored from (one per
    process), given the exact sum of their diagonals; None when not smaller than dense.

    With S_p = F_p F_p^T + R_p (R_p PSD, ||R_p||_2 <= e_p = error_p lambda_1(S_p) / 2), the
    sum is F F^T + sum_p R_p with F = [F_1 ... F_P]. The leading eigenpairs of F F^T come
    from the small matrix F^T F = U diag(mu) U^T: F U = V diag(sqrt(mu)), so F U_r is the
    new factor, without an [n, n] matrix (n R^2 operations for R = sum_p r_p). The sum's
    residual is the dropped part of F F^T plus sum_p R_p, so the bound recorded is
    (2 mu_{r+1} + sum_p 2 e_p) / mu_1, relative to mu_1 <= lambda_1(sum_p S_p)."""
    factor = torch.cat([part.factor.double() for part in parts], dim=1)
    values, mixing = _descending(*torch.linalg.eigh(factor.T @ factor))
    # each part's error is relative to its own lambda_1 = ||its first factor column||^2
    carried = sum(part.error * float(part.factor[:, 0].double().square().sum()) for part in parts)
    chosen = _rank(values, tolerance, factor.shape[0], max_rank, carried)
    if chosen is None:
        return None
    rank, bound = chosen
    new = factor @ mixing[:, :rank]
    rest = (diagonal.double() - new.square().sum(dim=1)).clamp_min(0)
    estimated = any(part.estimated for part in parts)
    return Factored(new.float(), rest.float(), bound, estimated)


def _descending(values: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``'s eigenpairs, largest first, eigenvalues clamped at 0."""
    return values.flip(0).clamp_min(0), vectors.flip(1)


def _rank(
    values: torch.Tensor, tolerance: float, n: int, max_rank: int | None, carried: float = 0.0
) -> tuple[int, float] | None:
    """(r, its bound) for the eigenvalues ``values`` (largest first; the leading ones of
    an [n, n] matrix, the rest taken as 0): the fewest eigenpairs whose bound
    (2 lambda_{r+1} + carried) / lambda_1 meets ``tolerance``, capped at ``max_rank``.
    None when the matrix is zero or the factors would hold as many values as it."""
    top = float(values[0])
    limit = n - 2 if max_rank is None else min(max_rank, n - 2)  # (n + 1) r + n < n^2
    if top == 0 or limit < 1:
        return None
    bounds = (2 * torch.cat([values, values.new_zeros(max(n - len(values), 1))]) + carried) / top
    meeting = torch.nonzero(bounds <= tolerance)
    rank = int(meeting[0]) if len(meeting) else n
    if rank > limit:
        if max_rank is None or max_rank >= n - 2:
            return None
        rank = limit
    rank = max(rank, 1)
    return rank, float(bounds[rank])


def stored_names(name: str) -> tuple[str, str]:
    """The two tensors of factored Gram matrix ``name``."""
    return name + FACTOR, name + DIAGONAL


def factored_tensors(
    grams: dict[str, torch.Tensor | Factored], tolerance: float, max_rank: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the tensors to store, the ``gram_factored`` metadata) for Gram matrices ``grams``
    (stored name -> matrix): each factored where that is smaller, else whole; a matrix
    already factored (several processes' combined sums) is stored as it is."""
    tensors, factored = {}, {}
    for name, gram in grams.items():
        form = gram if isinstance(gram, Factored) else factor_gram(gram, tolerance, max_rank)
        if form is None:
            tensors[name] = gram
            continue
        factor, diagonal = stored_names(name)
        tensors[factor], tensors[diagonal] = form.factor, form.diagonal
        factored[name] = {"rank": form.factor.shape[1], "error": form.error}
        if form.estimated:
            factored[name]["estimated"] = True
    return tensors, factored

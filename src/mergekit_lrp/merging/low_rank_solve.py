"""RegMean's solve from factored Gram matrices, by the Woodbury identity.

With every model's Gram matrix of one layer input stored factored, G_i = F_i F_i^T +
diag(d_i) (scores.gram_forms), the matrix :func:`.gram_solve.solve` factors is

    A = sum_i G~_i + lambda I = diag(D) + U U^T,
    G~_i = w_i (alpha G_i + (1 - alpha) diag(G_i)),   g_i = diag(G_i) = rowsum(F_i^2) + d_i,
    D = sum_i w_i (alpha d_i + (1 - alpha) g_i) + lambda,   U = [sqrt(alpha w_i) F_i]_i,

with lambda = ridge * mean(sum_i w_i g_i) as there. For R = sum_i r_i columns of U and
V = D^-1/2 U, K = I + V^T V (R x R):

    delta A^-1 = (M - (M V) K^-1 V^T) D^-1/2,   M = delta D^-1/2

so nothing of size n x n is formed: n R^2 + R^3 / 3 operations to factor K instead of
n^3 / 3 for A (and n^2 R to rebuild each G_i), and out * n * R per weight. The result is
the dense solve's up to rounding. The scaled matrix D^-1/2 A D^-1/2 = I + V V^T has the
condition number lambda_max(K), which is checked against the same limit as the dense
solve's (:func:`.gram_solve.condition_limit`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from mergekit_lrp.merging.gram_solve import LAYER_FACTORS, GramSolveError, condition_limit
from mergekit_lrp.scores.gram_forms import Factored

#: power iterations estimating lambda_max(K) (the estimate is a lower bound that is
#: within a few per cent of it long before this)
POWER_STEPS = 30


@dataclass(frozen=True)
class LowRankFactor:
    """What the solve of one layer input reuses across the weights reading it."""

    inv_sqrt_d: torch.Tensor  # [n]
    v: torch.Tensor  # [n, R] = D^-1/2 U
    cholesky: torch.Tensor  # [R, R] of K = I + V^T V


def uses_low_rank(forms: Sequence[dict | None], features: int) -> bool:
    """Whether the Woodbury solve is the cheaper one for an input of ``features`` = n:
    every model's matrix factored (``gram_factored`` entries), and its operation count
    below the dense solve's for the N models and R = sum of ranks. Per output row of the
    weights reading the input (at least n rows: q/k/v, gate/up, o and down each have as
    many) the Woodbury solve costs 8 n R + (2 n R^2 + R^3 / 3) / n and the dense one
    2 (N + 1) n^2 + n^3 / 3 / n, so with x = R / n the test is
    8 x + 2 x^2 + x^3 / 3 < 2 (N + 1) + 1 / 3 (x below ~0.66 for two models, ~1 for four)."""
    if not forms or any(form is None for form in forms):
        return False
    x = sum(int(form["rank"]) for form in forms) / features
    return 8 * x + 2 * x**2 + x**3 / 3 < 2 * (len(forms) + 1) + 1 / 3


def solve_low_rank(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    forms: Sequence[Callable[[], Factored]],
    weights: Sequence[float],
    alpha: float,
    ridge: float,
    dtype: torch.dtype,
    where: str,
    key: Hashable | None = None,
    name: str = "",
    users: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """The RegMean weight of one linear layer from factored Gram matrices (module doc);
    the arguments are :func:`.gram_solve.solve`'s, ``forms[i]()`` reading model i's."""
    device = base.device
    read = [form() for form in forms]
    factor = LAYER_FACTORS.take(key, name) if key is not None else None
    if factor is None:
        factor = _factorize(read, weights, alpha, ridge, dtype, device, where)
        if key is not None:
            LAYER_FACTORS.keep(key, name, factor, users)
    scaled = torch.zeros(base.shape, dtype=dtype, device=device)  # the numerator, then M
    for theta, form, weight in zip(thetas, read, weights, strict=True):
        delta = theta.to(dtype) - base.to(dtype)
        f = form.factor.to(device=device, dtype=dtype)
        diagonal = _diagonal_term(form, f, _gram_diagonal(form, f), weight, alpha)
        scaled.add_(delta * diagonal[None, :])
        scaled.addmm_(delta @ f, f.T, alpha=alpha * weight)
        del delta, f
    scaled.mul_(factor.inv_sqrt_d[None, :])
    correction = torch.cholesky_solve((scaled @ factor.v).T.contiguous(), factor.cholesky).T
    scaled.sub_(correction @ factor.v.T)
    scaled.mul_(factor.inv_sqrt_d[None, :])
    return (base.to(dtype) + scaled).to(base.dtype)


def _gram_diagonal(form: Factored, f: torch.Tensor) -> torch.Tensor:
    """g = diag(G) = rowsum(F^2) + d, in ``f``'s dtype."""
    return f.square().sum(dim=1) + form.diagonal.to(f)


def _diagonal_term(form: Factored, f: torch.Tensor, g: torch.Tensor, weight: float, alpha):
    """w (alpha d + (1 - alpha) g): the diagonal part of G~ for one model."""
    return weight * (alpha * form.diagonal.to(f) + (1 - alpha) * g)


def _factorize(read, weights, alpha, ridge, dtype, device, where) -> LowRankFactor:
    diagonal, mean_diagonal, columns = 0, 0, []
    for form, weight in zip(read, weights, strict=True):
        f = form.factor.to(device=device, dtype=dtype)
        g = _gram_diagonal(form, f)
        diagonal = diagonal + _diagonal_term(form, f, g, weight, alpha)
        mean_diagonal = mean_diagonal + weight * g
        columns.append(f * (alpha * weight) ** 0.5)
    lam = ridge * float(mean_diagonal.mean())
    d = diagonal + lam
    if not bool((d > 0).all()):
        dead = int((d <= 0).sum())
        raise GramSolveError(
            f"regmean: the Gram matrices {where} are singular: {dead} input feature(s) have "
            "no diagonal term in any model's factored Gram matrix (alpha 1 and ridge 0 leave "
            "only the factors); raise ridge or lower alpha"
        )
    inv_sqrt_d = d.rsqrt()
    v = torch.cat(columns, dim=1) * inv_sqrt_d[:, None]
    k = v.T @ v
    k.diagonal().add_(1)
    cholesky, info = torch.linalg.cholesky_ex(k)
    largest = _largest_eigenvalue(k) if int(info) == 0 else float("inf")
    limit = condition_limit(dtype)
    if not largest <= limit:
        raise GramSolveError(
            f"regmean: the Gram matrices {where} are too ill-conditioned to solve in "
            f"{str(dtype).removeprefix('torch.')} (condition estimate {largest:.2g}, limit "
            f"{limit:.2g}); raise ridge (now {ridge:g}) or lower alpha (now {alpha:g})"
        )
    return LowRankFactor(inv_sqrt_d, v, cholesky)


def _largest_eigenvalue(k: torch.Tensor) -> float:
    vector = torch.ones(k.shape[0], dtype=k.dtype, device=k.device)
    value = 1.0
    for _ in range(POWER_STEPS):
        product = k @ vector
        value = float(product.norm() / vector.norm())
        vector = product / product.norm()
    return value

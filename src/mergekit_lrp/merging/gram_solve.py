"""Merging with Gram files, without mergekit: RegMean's closed-form solve and the exact OBS
saliency, and which tensors a set of Gram files covers.

A Gram file (``quantity: input_gram``, docs/score-format.md) stores, for each distinct
input of a model's linear layers, G = mean over prompts of sum_t w_t x_t x_t^T, and maps
every linear weight to its input's matrix (``gram_of``). For a PyTorch weight W [out, in]
(y = x W^T), the outputs of a merged weight on model i's inputs differ from model i's by
||X_i (W - W_i)^T||^2 = tr((W - W_i) G_i (W - W_i)^T), so the weight that fits every
model's outputs on its own inputs best is

    W = (sum_i W_i G_i) (sum_i G_i)^-1                                   (RegMean)

:func:`solve` computes it in task-vector form, around the base:

    G~_i  = weight_i * (alpha * G_i + (1 - alpha) * diag(G_i))
    A     = sum_i G~_i + lambda * I,   lambda = ridge * mean(diag(sum_i G~_i))
    W     = W_base + (sum_i (W_i - W_base) G~_i) A^-1

which is RegMean exactly at ridge 0 (the base terms cancel) and, with ridge > 0, pulls the
merged change towards zero in the input directions the calibration data hardly reaches
(towards the base, not towards a zero weight). The solve runs on the diagonally scaled
matrix S A S (S = diag(A)^-1/2), by a Cholesky factorization; a factorization that fails,
or whose pivots bound the condition number of S A S above :func:`condition_limit` for
the solve's dtype, is refused in one line naming the layer and the files.

:func:`obs_column_factor` gives the exact OBS (SparseGPT-style) saliency of removing one
entry of a linear weight's row with the rest of the row refit: w_ij^2 / [(G + lambda I)^-1]_jj
(docs/method.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.merging.tensor_names import layer_of
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader

#: RegMean's off-diagonal scale: the RegMean paper shrinks the off-diagonal entries of
#: the Gram matrices for stability; 0.9 keeps most of the correlations (docs/method.md)
DEFAULT_ALPHA = 0.9
#: regmean's ridge, relative to the mean diagonal of the summed Gram matrices: chosen
#: with regmean's other defaults on the benchmark's validation split (docs/BENCHMARKS.md,
#: "Choosing the defaults")
DEFAULT_RIDGE = 1e-2
#: the fixed ridge of lrp's OBS saliency from a Gram file, on the same scale
OBS_RIDGE = 1e-4


class GramSolveError(LrpError):
    """A layer's Gram matrices cannot be solved: singular, or too ill-conditioned."""


def condition_limit(dtype: torch.dtype) -> float:
    """The largest condition number of the scaled matrix a solve in ``dtype`` accepts:
    0.01 / machine epsilon (4.5e13 in float64, 8.4e4 in float32), where the relative
    error of the solution can reach about 1 %."""
    return 0.01 / torch.finfo(dtype).eps


def resolve_dtype(solve_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float64 on a CPU, float32 on a GPU (with the conditioning check)."""
    if solve_dtype == "auto":
        return torch.float64 if torch.device(device).type == "cpu" else torch.float32
    return getattr(torch, solve_dtype)


# ------------------------------------------------------------------ which tensors


def layer_pattern(name: str) -> str:
    """``name`` with its layer index replaced by ``*`` (itself outside the layers), so a
    module can be compared across layers: ``model.layers.*.mlp.down_proj.weight``."""
    layer = layer_of(name)
    if layer is None:
        return name
    stack = layer.rsplit(".", 1)[0]
    return f"{stack}.*{name[len(layer) :]}"


@lru_cache(maxsize=64)
def gram_patterns(reader: ScoreReader) -> frozenset[str]:
    return frozenset(layer_pattern(name) for name in reader.metadata.gram_of)


def expects_gram(name: str, readers: Sequence[ScoreReader]) -> bool:
    """Whether ``name`` is a linear weight that the Gram files cover: some file has a
    Gram matrix for it, or for the same module in another layer. A file that lacks it
    then misses a layer; a tensor no file covers (embeddings, norms, biases, fused MoE
    experts) is not a linear layer for them."""
    pattern = layer_pattern(name)
    return any(name in r.metadata.gram_of or pattern in gram_patterns(r) for r in readers)


def gram_reader(model: Hashable, path: str | None, open_file: Callable[[str], ScoreReader]):
    """Model ``model``'s Gram file, refusing none and a per-parameter score file."""
    if not path:
        raise LRPConfigError(
            f"regmean: model {model} has no lrp_scores; give it its Gram file "
            "(`lrp_scores: path.safetensors`, from lrp-compute --method gram)"
        )
    reader = open_file(path)
    if not reader.is_gram:
        raise ScoreFileError(
            f"{reader.path}: holds {reader.metadata.quantity} scores (one per weight entry, "
            f"lrp-compute --method {reader.metadata.method}), but regmean (model {model}) "
            "needs a Gram file (quantity input_gram): compute one with lrp-compute "
            "--method gram, or merge this file with lrp"
        )
    return reader


def solves(
    name: str, models: Sequence[Hashable], readers: Sequence[ScoreReader], missing_scores: str
) -> bool:
    """True when ``regmean`` solves tensor ``name`` from these models' Gram files; False
    when it merges it by its ``other_tensors`` rule. A linear weight a file lacks is
    refused unless ``missing_scores: other_tensors``."""
    if not expects_gram(name, readers):
        return False
    lacking = [(m, r) for m, r in zip(models, readers, strict=True) if r.gram_name(name) is None]
    if not lacking:
        return True
    if missing_scores == "other_tensors":
        return False
    model, reader = lacking[0]
    raise ScoreFileError(
        f"{reader.path}: no Gram matrix for linear weight {name!r} (model {model}), which "
        "the Gram files have for this module elsewhere; recompute the file with "
        "lrp-compute --method gram on this model, or set missing_scores: other_tensors "
        "(merge such weights like the other tensors)"
    )


def check_gram_shape(reader: ScoreReader, name: str, shape: Sequence[int]) -> None:
    """Refuse a Gram matrix that does not fit weight ``name`` of ``shape`` ([out, in])."""
    stored = reader.gram_name(name)
    found = reader.shape(stored)
    if len(shape) != 2:
        raise ScoreFileError(
            f"{reader.path}: has a Gram matrix for {name!r}, but that weight has shape "
            f"{tuple(shape)}, not a linear layer's [out, in]; the file does not belong to "
            "this checkpoint"
        )
    if tuple(found) != (shape[1], shape[1]):
        raise ScoreFileError(
            f"{reader.path}: the Gram matrix of {name!r} has shape {tuple(found)}, but the "
            f"weight {tuple(shape)} reads {shape[1]} input features; the file does not "
            "belong to this checkpoint (recompute it with lrp-compute --method gram)"
        )
    dtype = reader.dtype_name(stored)
    if dtype not in ("F32", "BF16"):
        raise ScoreFileError(
            f"{reader.path}: the Gram matrix of {name!r} is {dtype}; expected F32 or BF16"
        )


# ------------------------------------------------------------------ the solve


@dataclass(frozen=True)
class Factor:
    """The Cholesky factor of S A S and the scale S = diag(A)^-1/2 of one layer input."""

    cholesky: torch.Tensor
    scale: torch.Tensor


#: rows of a Gram matrix converted to the solve's dtype at a time (about 64 MB in float64)
BLOCK_ENTRIES = 2**23


def accumulate(
    numerator: torch.Tensor,
    summed: torch.Tensor | None,
    delta: torch.Tensor,
    gram: torch.Tensor,
    alpha: float,
    weight: float,
) -> None:
    """numerator += delta G~ and summed += G~ for G~ = weight * (alpha * G + (1 - alpha) *
    diag(G)), converting ``gram`` (as read, float32) to the solve's dtype and device a
    block of rows at a time, so that no full-size converted copy exists."""
    n = gram.shape[0]
    rows = max(1, BLOCK_ENTRIES // max(n, 1))
    diagonal = gram.diagonal()
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = gram[start:stop].to(device=numerator.device, dtype=numerator.dtype, copy=True)
        block.mul_(alpha * weight)
        index = torch.arange(stop - start, device=block.device)
        block[index, index + start] = diagonal[start:stop].to(block) * weight
        numerator.addmm_(delta[:, start:stop], block)
        if summed is not None:
            summed[start:stop].add_(block)


def factorize(
    summed: torch.Tensor, ridge: float, where: str, hint: str, dead_hint: str | None = None
) -> Factor:
    """Factor A = ``summed`` + ridge * mean(diag) * I (``summed`` is overwritten).

    Raises :class:`GramSolveError` naming ``where`` when A is singular or its scaled
    condition number (bounded below by 1 / the smallest squared pivot of S A S, whose
    diagonal is 1) exceeds :func:`condition_limit`; ``hint`` says what to change
    (``dead_hint`` when input features are zero in every matrix, default ``hint``).
    """
    dtype = summed.dtype
    diagonal = summed.diagonal()
    mean = float(diagonal.mean()) if diagonal.numel() else 0.0
    diagonal.add_(ridge * mean)
    if not (mean > 0 and bool((diagonal > 0).all())):
        dead = int((diagonal <= 0).sum())
        raise GramSolveError(
            f"regmean: the Gram matrices {where} are singular: {dead} input feature(s) are "
            f"zero in every model's Gram matrix (no calibration token reached them); "
            f"{dead_hint or hint}"
        )
    scale = diagonal.rsqrt()
    summed.mul_(scale[:, None]).mul_(scale[None, :])
    info = torch.empty((), dtype=torch.int32, device=summed.device)
    cholesky, info = torch.linalg.cholesky_ex(summed, out=(summed, info))  # in place
    limit = condition_limit(dtype)
    if int(info) == 0:
        pivot = float(cholesky.diagonal().min())
        estimate = 1 / pivot**2 if pivot > 0 else float("inf")
    else:
        estimate = float("inf")
    if not estimate <= limit:
        found = "not positive definite" if int(info) else f"condition estimate {estimate:.2g}"
        raise GramSolveError(
            f"regmean: the Gram matrices {where} are singular or too ill-conditioned to "
            f"solve in {str(dtype).removeprefix('torch.')} ({found}, limit {limit:.2g}); "
            f"{hint}"
        )
    return Factor(cholesky, scale)


def apply_inverse(numerator: torch.Tensor, factor: Factor) -> torch.Tensor:
    """``numerator`` A^-1 for A = S^-1 L L^T S^-1: (N S) (S A S)^-1 S."""
    scaled = numerator * factor.scale[None, :]
    solved = torch.cholesky_solve(scaled.T.contiguous(), factor.cholesky).T
    return solved * factor.scale[None, :]


def sharing_weights(readers: Sequence[ScoreReader], name: str) -> frozenset[str]:
    """The weights that read the same input as ``name`` in every file (q/k/v, gate/up)."""
    stored = [r.gram_name(name) for r in readers]
    candidates = [w for w, s in readers[0].metadata.gram_of.items() if s == stored[0]]
    return frozenset(
        w
        for w in candidates
        if all(r.gram_name(w) == s for r, s in zip(readers, stored, strict=True))
    )


class _Factors:
    """The factorizations of the current layer's inputs, each kept from the first weight
    that reads its input to the last (mergekit merges a layer's tensors in name order:
    k, o, q, v, so o's input comes between k's and q's), all dropped when a tensor of
    another layer comes: memory stays within one layer's statistics."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[Hashable, tuple[Factor, set[str]]] = {}
        self.layer: str | None = None

    def take(self, key: Hashable, name: str) -> Factor | None:
        with self.lock:
            layer = layer_of(name)
            if layer != self.layer:
                self.entries.clear()
                self.layer = layer
            found = self.entries.get(key)
            if found is None:
                return None
            factor, waiting = found
            waiting.discard(name)
            if not waiting:
                del self.entries[key]
            return factor

    def keep(self, key: Hashable, name: str, factor: Factor, users: frozenset[str]) -> None:
        waiting = set(users) - {name}
        with self.lock:
            if waiting and layer_of(name) == self.layer:
                self.entries[key] = (factor, waiting)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.layer = None


#: the current layer's factorizations, of the dense solve and of the low-rank one
LAYER_FACTORS = _Factors()
#: shared with the OBS factors' cache below
_FACTORS_LOCK = threading.Lock()


def solve(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    grams: Sequence[Callable[[], torch.Tensor]],
    weights: Sequence[float],
    alpha: float,
    ridge: float,
    dtype: torch.dtype,
    where: str,
    key: Hashable | None = None,
    name: str = "",
    users: frozenset[str] = frozenset(),
) -> torch.Tensor:
    """The RegMean weight of one linear layer (module doc), in ``base``'s dtype.

    ``grams[i]()`` reads model i's Gram matrix (float32, on the CPU); it is read once per
    call, converted a block of rows at a time (:func:`accumulate`) and dropped after use,
    so memory holds the summed matrix (then, in place, its factor) and one Gram matrix.
    ``key`` names the layer input's factorization (the files, the Gram name, the weights
    and settings) and ``users`` the weights ``name`` shares it with: the factorization is
    kept for them, and dropped after the last one.
    """
    device = base.device
    raise_ridge = f"raise ridge (now {ridge:g}; e.g. {max(ridge * 100, 1e-3):g})"
    hint = f"{raise_ridge} or lower alpha (now {alpha:g})" + (
        ", or set solve_dtype: float64" if dtype != torch.float64 else ""
    )
    factor = LAYER_FACTORS.take(key, name) if key is not None else None
    numerator = torch.zeros(base.shape, dtype=dtype, device=device)
    summed = None
    if factor is None:
        n = base.shape[1]
        summed = torch.zeros((n, n), dtype=dtype, device=device)
    for theta, read, weight in zip(thetas, grams, weights, strict=True):
        delta = theta.to(dtype) - base.to(dtype)
        accumulate(numerator, summed, delta, read(), alpha, weight)
        del delta
    if factor is None:
        factor = factorize(summed, ridge, where, hint, raise_ridge)
        del summed
        if key is not None:
            LAYER_FACTORS.keep(key, name, factor, users)
    delta = apply_inverse(numerator, factor)
    return (base.to(dtype) + delta).to(base.dtype)


def forget_factors() -> None:
    """Drop the cached factorizations, regmean's and the OBS saliency's (the end of a
    merge, or a test)."""
    LAYER_FACTORS.clear()
    with _FACTORS_LOCK:
        _OBS_FACTORS.clear()


# ------------------------------------------------------------------ OBS saliency


def obs_column_factor(
    reader: ScoreReader, name: str, ridge: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """1 / [(G + lambda I)^-1]_jj for each input column j of weight ``name`` (float32),
    lambda = ``ridge`` * mean(diag G), computed in float64 on ``device``.

    Zeroing entry w_ij of a row and refitting the rest of the row to the layer's outputs
    on the calibration inputs raises the squared output error by w_ij^2 times this factor
    (OBS); with a diagonal G it is G_jj, the ``activation`` signal's diag(X^T X).
    """
    key = (reader, reader.gram_name(name), ridge, str(torch.device(device)))
    with _FACTORS_LOCK:
        found = _OBS_FACTORS.get(key)
    if found is None:
        found = _obs_factor(reader, name, ridge, key[3])
        with _FACTORS_LOCK:
            if len(_OBS_FACTORS) >= 256:  # [in] vectors: small, but not without bound
                _OBS_FACTORS.pop(next(iter(_OBS_FACTORS)))
            _OBS_FACTORS[key] = found
    return found


# (reader, stored Gram, ridge, device) -> factor; a reader is one version of one file
_OBS_FACTORS: dict[tuple, torch.Tensor] = {}


def _obs_factor(reader: ScoreReader, name: str, ridge: float, device: str) -> torch.Tensor:
    gram = reader.gram(name).to(device=device, dtype=torch.float64)
    where = f"{reader.gram_name(name)!r} of {name!r} ({reader.path})"
    hint = (
        "the lrp merge's OBS saliency uses a fixed ridge; recompute the Gram file on more "
        "calibration prompts, or give lrp a score file of another signal"
    )
    try:
        factor = factorize(gram, ridge, where, hint)
    except GramSolveError as error:
        raise GramSolveError(str(error).replace("regmean: ", "lrp: ", 1)) from None
    scaled_diagonal = torch.cholesky_inverse(factor.cholesky).diagonal()  # diag((S A S)^-1)
    inverse_diagonal = scaled_diagonal * factor.scale.square()  # diag(A^-1)
    return (1 / inverse_diagonal).float()

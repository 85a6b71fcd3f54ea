"""The scores of one tensor of one model: the one definition that the merge kernel
(:mod:`.methods`) and the pre-merge check (:mod:`.preflight`) share, so that what is
checked before a merge is exactly what the merge will read.

A tensor's scores are found in the model's score file under the tensor's own name, a
tied alias, or (MoE experts that transformers 5 fuses on load, while checkpoints and
score files store them per expert) assembled from several stored score tensors by the
conversion mergekit applies to the weights. A Gram file (``input_gram``) holds no score per
entry: the importance of a linear weight's entries is then the exact OBS saliency computed
from the Gram matrix of its input (:func:`.gram_solve.obs_column_factor`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import lru_cache

import torch

from mergekit_lrp.merging.gram_solve import OBS_RIDGE, check_gram_shape, obs_column_factor
from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.scores.file import SCORE_DTYPES, ScoreFileError, ScoreReader

#: quantities whose scores are the same along a weight's rows (one value an input column)
COLUMN_QUANTITIES = ("mean_sq_input",)


def open_scores(path: str) -> ScoreReader:
    """The reader of a score file, its header read and validated once while the file is
    unchanged (a file rewritten in the same process is opened anew)."""
    stat = os.stat(path) if os.path.exists(path) else None
    key = (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None
    return _open_scores(str(path), key)


@lru_cache(maxsize=64)
def _open_scores(path: str, _version) -> ScoreReader:
    return ScoreReader(path)


def forget_readers() -> None:
    """Drop the open score files (the end of a merge)."""
    _open_scores.cache_clear()


@dataclass(frozen=True)
class TensorScores:
    """Where the scores of tensor ``name`` of ``model`` come from.

    ``fallback`` is None when they come from ``reader``; otherwise the model has none for
    this tensor and ``missing_scores`` said what to do: ``magnitude`` (rank by |delta|)
    or ``base`` (the model contributes nothing to this tensor).
    """

    model: Hashable
    name: str
    reader: ScoreReader | None
    missing_scores: str = "error"
    converted: bool = False
    fallback: str | None = None

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`ScoreFileError` unless the scores can be read with ``shape``;
        reads headers only (NaN/Inf are found when the tensor is read)."""
        if self.fallback is not None:
            return
        if self.reader.is_gram:
            check_gram_shape(self.reader, self.name, shape)
            return
        if self.converted:
            assembled = _assemble(self.reader, self.name, _meta_loader(self.reader))
            _check_shape(self.reader, self.name, tuple(assembled.shape), shape)
            return
        _check_shape(self.reader, self.name, self.reader.shape(self.name), shape)
        dtype = self.reader.dtype_name(self.name)
        if dtype not in SCORE_DTYPES:
            raise ScoreFileError(
                f"{self.reader.path}: scores for {self.name!r} are {dtype}; expected F32 or BF16"
            )

    def read(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The scores as float32 tensor of ``shape``."""
        if not self.converted:
            return self.reader.get(self.name, shape=shape)
        assembled = _assemble(self.reader, self.name, self.reader.get)
        _check_shape(self.reader, self.name, tuple(assembled.shape), tuple(shape))
        return assembled.float().contiguous()  # owned: importance_of writes into it


def locate_scores(
    model: Hashable, name: str, scores_path: str | None, missing_scores: str
) -> TensorScores:
    """Find the scores of tensor ``name`` of ``model``, or apply ``missing_scores``."""
    reader = open_scores(scores_path) if scores_path else None
    if reader is not None and reader.is_gram:
        if reader.gram_name(name) is not None:
            return TensorScores(model, name, reader, missing_scores)
    elif reader is not None:
        if reader.resolve(name) is not None:
            return TensorScores(model, name, reader, missing_scores)
        if _convertible(reader, name):
            return TensorScores(model, name, reader, missing_scores, converted=True)
    if missing_scores != "error":
        return TensorScores(model, name, reader, missing_scores, fallback=missing_scores)
    fix = (
        "set missing_scores: magnitude (use |delta|) or base (keep the base weight for this model)"
    )
    if reader is None:
        raise LRPConfigError(
            f"lrp: model {model} has no lrp_scores. Add `lrp_scores: path.safetensors` to its "
            f"parameters (compute it with lrp-compute), or {fix}"
        )
    raise ScoreFileError(
        f"{reader.path}: no scores for tensor {name!r} (model {model}); compute them with "
        f"lrp-compute on this model, or {fix}"
    )


def _convertible(reader: ScoreReader, name: str) -> bool:
    from mergekit.architecture.conversion import can_convert_checkpoint_keys

    return can_convert_checkpoint_keys(reader.metadata.model_type, reader.names(), name)


def _meta_loader(reader: ScoreReader) -> Callable[[str], torch.Tensor]:
    return lambda stored: torch.empty(reader.shape(stored), dtype=torch.float32, device="meta")


def _assemble(reader: ScoreReader, name: str, load: Callable[[str], torch.Tensor]):
    """``name``'s scores built from the stored ones by mergekit's checkpoint conversion."""
    from mergekit.architecture.conversion import convert_checkpoint_tensors

    sources = {stored: (lambda stored=stored: load(stored)) for stored in reader.names()}
    try:
        scores = convert_checkpoint_tensors(reader.metadata.model_type, sources, name)
    except RuntimeError as error:  # torch.cat / stack of parts with other shapes
        raise ScoreFileError(
            f"{reader.path}: scores for {name!r} are assembled from stored tensors whose "
            f"shapes do not fit together ({error}); the file does not match the checkpoint"
        ) from None
    if scores is None:
        raise ScoreFileError(f"{reader.path}: scores for {name!r} could not be assembled")
    return scores


def _check_shape(reader: ScoreReader, name: str, found: tuple, expected: tuple) -> None:
    if tuple(found) != tuple(expected):
        raise ScoreFileError(
            f"{reader.path}: scores for {name!r} have shape {tuple(found)}, the weight has "
            f"{tuple(expected)}"
        )


def check_mode(reader: ScoreReader, mode: str, model: Hashable) -> None:
    """Refuse an ``importance`` mode the file's quantity cannot serve."""
    quantity = reader.metadata.quantity
    if mode == "scores" and reader.is_gram:
        raise LRPConfigError(
            f"lrp: importance: scores ranks entries by their scores alone, but {reader.path} "
            f"(model {model}) is a Gram file ({quantity}): its OBS saliency is of the change "
            "or of the weight; use importance: delta or weight with it"
        )
    if mode == "scores" and quantity in COLUMN_QUANTITIES:
        raise LRPConfigError(
            f"lrp: importance: scores ranks entries by their scores alone, but {reader.path} "
            f"(model {model}) holds {quantity}, one value per input column, which ties every "
            "entry of a column; use importance: delta or weight with it"
        )


def require_per_entry_scores(reader: ScoreReader, method: str, model: Hashable) -> None:
    """Refuse a Gram file where a method reads one score per weight entry."""
    if reader.is_gram:
        raise ScoreFileError(
            f"{reader.path}: is a Gram file ({reader.metadata.quantity}, for regmean or "
            f"lrp), but {method} (model {model}) ranks entries by per-entry scores; give it "
            "a score file from lrp-compute --method attnlrp, gradient, fisher or activation"
        )


def importance_of(
    scores: TensorScores, theta: torch.Tensor, delta: torch.Tensor, mode: str
) -> torch.Tensor | None:
    """Importance of each entry of ``delta`` (see docs/method.md), or None when the model
    contributes nothing to this tensor (``missing_scores: base``).

    With s the scores: ``delta`` = |delta| * s for gradient magnitudes (attnlrp, gradient),
    delta^2 * s for squared quantities (fisher, activation: the OBS / Fisher-merging
    saliency); ``weight`` the same with theta; ``scores`` = s alone. Scores that are the
    same for every entry rank nothing (top-k would keep entries in index order): they are
    refused, or replaced as ``missing_scores`` says. From a Gram file: delta^2 (or theta^2)
    times 1 / [(G + lambda I)^-1]_jj of the entry's input column j, the exact OBS
    saliency, lambda = :data:`.gram_solve.OBS_RIDGE` * mean(diag G).
    """
    fallback = scores.fallback
    if fallback is None and scores.reader.is_gram:
        check_mode(scores.reader, mode, scores.model)
        factor = obs_column_factor(scores.reader, scores.name, OBS_RIDGE, delta.device)
        return (theta if mode == "weight" else delta).float().square() * factor
    if fallback is None:
        check_mode(scores.reader, mode, scores.model)
        values = scores.read(delta.shape).to(delta.device)
        if values.numel() > 1 and _constant(values):
            if scores.missing_scores == "error":
                raise ScoreFileError(
                    f"{scores.reader.path}: scores for {scores.name!r} are the same for every "
                    f"entry ({float(values.reshape(-1)[0]):g}), so they rank nothing (model "
                    f"{scores.model}); recompute them, or set missing_scores: magnitude or base"
                )
            fallback = scores.missing_scores
    if fallback == "base":
        return None
    if fallback == "magnitude":
        return delta.abs().float()
    if mode == "scores":
        return values
    source = (theta if mode == "weight" else delta).float()
    # in place on the scores just read (a fresh tensor this function owns)
    if scores.reader.metadata.quantity == "mean_abs_grad":
        return values.mul_(source).abs_()  # |x| * s, as |x * s| (s >= 0): the same bits
    return values.mul_(source.square())


def _constant(values: torch.Tensor) -> bool:
    low, high = torch.aminmax(values)
    return bool(low == high)

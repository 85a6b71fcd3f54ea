"""The Python API for notebooks: score a loaded model, read a score file, and build
the mask the ``lrp`` merge would use for one tensor.

Exported lazily from the package (``from mergekit_lrp import merge_mask``), so
``import mergekit_lrp`` stays cheap; torch is imported on first use of a name.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.file import ScoreReader

__all__ = ["compute_scores", "merge_mask", "read_scores"]


def compute_scores(
    model,
    tokenizer,
    prompts: Iterable[str],
    *,
    target: str = "predicted",
    max_length: int = 512,
    gradient_checkpointing: bool = True,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """AttnLRP scores of an already loaded model, in memory: parameter name -> mean over
    ``prompts`` of |d target / d theta| (float32, the parameter's shape), what
    ``lrp-compute`` writes to a file. The model must be of a supported architecture
    (docs/attnlrp.md); it is patched only for the duration of the call.

    Example::

        >>> from mergekit_lrp import compute_scores
        >>> scores = compute_scores(model, tokenizer, ["2 + 2 = 4", "3 * 3 = 9"])
        >>> scores["model.layers.0.mlp.up_proj.weight"].shape == (
        ...     model.model.layers[0].mlp.up_proj.weight.shape)
        True
    """
    from mergekit_lrp.scoring.loop import relevance_scores
    from mergekit_lrp.scoring.options import ComputeOptions

    prompts = [str(p) for p in prompts]
    if not prompts:
        raise LrpError("compute_scores: no prompts given")
    options = ComputeOptions(
        target=target,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        progress=progress,
    )
    return relevance_scores(model, tokenizer, prompts, options)


def read_scores(path: str | os.PathLike) -> ScoreReader:
    """Open a score file written by ``lrp-compute``: its ``metadata``
    (:class:`~mergekit_lrp.scores.file.ScoreMetadata`), ``names()`` and ``get(name)``
    (float32, validated). Tensors are read one at a time, on demand.

    Example::

        >>> from mergekit_lrp import read_scores
        >>> reader = read_scores("scores/ft-math.safetensors")
        >>> reader.metadata.num_prompts, reader.metadata.target
        (4, 'predicted')
        >>> reader.get("model.layers.0.mlp.up_proj.weight").dtype
        torch.float32
    """
    return ScoreReader(path)


class _TensorReader:
    """One in-memory score tensor behind the reader interface the merge reads through."""

    def __init__(self, name: str, values: torch.Tensor, quantity: str):
        from types import SimpleNamespace

        self.path = f"<scores of {name}>"
        self.metadata = SimpleNamespace(quantity=quantity)
        self._values = values

    def get(self, name: str, shape=None) -> torch.Tensor:
        from mergekit_lrp.scores.file import ScoreFileError

        if shape is not None and tuple(self._values.shape) != tuple(shape):
            raise ScoreFileError(
                f"scores have shape {tuple(self._values.shape)}, the weight has {tuple(shape)}"
            )
        values = self._values.float()
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ScoreFileError("scores must be finite and non-negative")
        return values


def merge_mask(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    scores: torch.Tensor | None,
    density: float = 0.9,
    importance: str = "delta",
    *,
    protected: bool = False,
    name: str = "tensor",
    quantity: str = "mean_abs_grad",
) -> torch.Tensor:
    """The boolean mask of the entries of ``finetuned - base`` that ``lrp`` keeps for
    this tensor with ``selection: topk``: exactly round(density * numel) entries of
    highest importance (the default ``selection: stochastic`` draws the kept entries,
    with probabilities rising with the same ranking)
    (``delta``: |finetuned - base| * scores; ``weight``: |finetuned| * scores; squares
    instead of absolute values when ``quantity`` is ``mean_sq_grad`` or ``mean_sq_input``,
    the quantities of ``fisher`` and ``activation`` files), ties kept in index order.
    ``scores=None`` ranks by |delta| (``missing_scores: magnitude``).
    ``protected=True`` (what ``protect_special`` does for norms, biases and
    embeddings) keeps everything. The same functions as the merge kernel compute it.

    Example::

        >>> import torch
        >>> from mergekit_lrp import merge_mask
        >>> base = torch.zeros(2, 2)
        >>> finetuned = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        >>> scores = torch.tensor([[4.0, 1.0], [0.0, 1.0]])
        >>> merge_mask(base, finetuned, scores, density=0.5)
        tensor([[ True,  True],
                [False, False]])
    """
    from mergekit_lrp.merging.selection import kept_count, top_k_mask
    from mergekit_lrp.merging.tensor_scores import (
        IMPORTANCE_MODES,
        LRPConfigError,
        TensorScores,
        importance_of,
    )

    # the merge's checks (merging/method.py), without importing mergekit
    if importance not in IMPORTANCE_MODES:
        allowed = ", ".join(IMPORTANCE_MODES)
        raise LRPConfigError(f"lrp: importance must be one of {allowed}; got {importance!r}")
    if not 0 < density <= 1:
        raise LRPConfigError(f"lrp: density for {name} must be in (0, 1], got {density}")
    if base.shape != finetuned.shape:
        raise LrpError(
            f"merge_mask: base has shape {tuple(base.shape)}, finetuned {tuple(finetuned.shape)}"
        )
    if protected or density >= 1:
        return torch.ones_like(finetuned, dtype=torch.bool)
    delta = finetuned.float() - base.float()
    if scores is None:
        located = TensorScores(name, name, None, fallback="magnitude")
    else:
        located = TensorScores(name, name, _TensorReader(name, scores, quantity))
    values = importance_of(located, finetuned.float(), delta, importance)
    return top_k_mask(values, kept_count(density, delta.numel()))

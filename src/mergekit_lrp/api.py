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
from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY, DEFAULTS
from mergekit_lrp.scores.file import GRAM_QUANTITIES, ScoreReader

__all__ = ["compute_scores", "merge_mask", "read_scores"]


def compute_scores(
    model,
    tokenizer,
    prompts: Iterable[str],
    *,
    method: str = "attnlrp",
    target: str = "predicted",
    max_length: int | None = None,
    gradient_checkpointing: bool | str = "auto",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The scores ``lrp-compute --method METHOD`` would write for an already loaded model,
    in memory: parameter name -> the mean over ``prompts`` of the signal's quantity
    (attnlrp: |d target / d theta| under the AttnLRP rules; float32, the parameter's
    shape). The model must be of a supported architecture (docs/attnlrp.md); it is patched
    only for the duration of the call. ``gradient_checkpointing="auto"`` decides as
    ``lrp-compute`` does (on only when a ``max_length`` prompt's activations do not fit);
    ``max_length=None``: 512 tokens, or the model's ``max_position_embeddings`` if fewer.

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
        method=method,
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

    is_gram = False  # one score per entry: a Gram matrix is read from its file

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
    density: float = DEFAULT_DENSITY,
    importance: str = DEFAULTS.importance,
    *,
    selection: str = DEFAULTS.selection,
    epsilon: float | None = None,
    seed: int = 0,
    model: str = "",
    protect_special: bool = True,
    name: str = "tensor",
    quantity: str = "mean_abs_grad",
) -> torch.Tensor:
    """The boolean mask of the entries of ``finetuned - base`` that ``lrp`` keeps for the
    tensor ``name`` of ``model`` (the model's path or reference as the merge config gives
    it: its draw is seeded by it), in a merge run with ``mergekit-yaml --random-seed
    seed``: the same functions as the merge kernel draw it.

    Importance: ``delta``: |finetuned - base| * scores, ``weight``: |finetuned| * scores
    (squares instead of absolute values when ``quantity`` is ``mean_sq_grad`` or
    ``mean_sq_input``, the quantities of ``fisher`` and ``activation`` files), ``scores``
    alone; ``scores=None`` ranks by |delta| (``missing_scores: magnitude``).
    ``selection: topk`` (lrp's default) keeps exactly round(density * numel) entries of
    highest importance, ties in index order; ``selection: stochastic`` draws each entry
    with a probability rising with its importance rank (``epsilon`` unset: lrp's default
    spread). With ``protect_special`` (the default, as in the
    merge) 1-D tensors and embeddings / output heads (by ``name``) keep everything.
    ``density`` is the tensor's own: with ``budget: layer`` or ``model`` the merge moves it
    per tensor.

    Example::

        >>> import torch
        >>> from mergekit_lrp import merge_mask
        >>> base = torch.zeros(2, 2)
        >>> finetuned = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        >>> scores = torch.tensor([[4.0, 1.0], [0.0, 1.0]])
        >>> merge_mask(base, finetuned, scores, density=0.5, selection="topk")
        tensor([[ True,  True],
                [False, False]])
    """
    from mergekit_lrp.merging.masks import MaskSettings, kept_mask
    from mergekit_lrp.merging.tensor_scores import TensorScores

    settings = MaskSettings(density, importance, selection, epsilon, seed, protect_special)
    if base.shape != finetuned.shape:
        raise LrpError(
            f"merge_mask: base has shape {tuple(base.shape)}, finetuned {tuple(finetuned.shape)}"
        )
    if quantity in GRAM_QUANTITIES:
        raise LrpError(
            f"merge_mask: quantity {quantity!r} is a Gram matrix per layer input, not a score "
            "per entry; the merge reads such files itself (lrp_scores of lrp or regmean)"
        )
    if scores is None:
        located = TensorScores(name, name, None, fallback="magnitude")
    else:
        located = TensorScores(name, name, _TensorReader(name, scores, quantity))
    delta = finetuned.float() - base.float()
    return kept_mask(located, finetuned.float(), delta, settings, model)

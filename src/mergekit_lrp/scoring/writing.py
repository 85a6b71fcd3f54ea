"""Writing for ``lrp-compute``: the output path checked before any work, the checks the
sums must pass before a file is written (finite; no matrix that the output ignored),
the file's metadata, and the score or Gram file itself, atomically."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch

from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import (
    ADAPTER_SCHEME,
    SCHEME,
)
from mergekit_lrp.scores.gram_forms import Factored, factored_tensors
from mergekit_lrp.scoring.checkpoint_names import checkpoint_layout
from mergekit_lrp.scoring.loading import DTYPES, Source
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions


def check_output(output: Path, options: ComputeOptions) -> None:
    """Create the output's folder and make sure it is writable: fail now, not after hours."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ComputeError(f"cannot create output directory {output.parent} ({error})") from None
    if output.is_dir():
        example = output / "scores.safetensors"
        raise ComputeError(f"output {output} is a folder; name the score file, e.g. -o {example}")
    if output.exists() and not options.overwrite:
        raise ComputeError(f"output {output} already exists; pass --overwrite to replace it")
    try:
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as error:
        raise ComputeError(f"cannot write to {output.parent} ({error.strerror})") from None


def score_metadata(source: Source, loaded, options, count: int, tokens: int) -> ScoreMetadata:
    signal = options.signal
    extra = {"token_weighting": signal.token_weighting} if signal.token_weighting else {}
    return ScoreMetadata(
        model_fingerprint=loaded.fingerprint,
        num_prompts=count,
        num_tokens=tokens,
        target=signal.target(options.target),
        model_type=source.model_type,
        method=signal.name,
        quantity=signal.quantity,
        fingerprint_scheme=ADAPTER_SCHEME if source.model.adapter else SCHEME,
        generator=f"mergekit-lrp {version('mergekit-lrp')}",
        extra={
            "max_length": str(options.max_length),
            "dtype": str(loaded.dtype),
            "model": source.model.given,
            "revision": source.revision or "",
            "prompts": source.prompts,
            **extra,
        },
    )


@dataclass(frozen=True)
class Written:
    #: checkpoint tensors the file has no scores for (the model class does not use them,
    #: or the signal measures nothing for them)
    unscored: list[str]
    #: those of two or more dimensions
    unscored_matrices: list[str]
    #: tensors whose scores were zero everywhere, left out of the file
    no_relevance: list[str]
    #: gram: checkpoint matrices without a Gram matrix, by reason
    without_gram: dict[str, list[str]] = field(default_factory=dict)
    #: gram: (number of Gram matrices, bytes written for them)
    gram: tuple[int, int] | None = None
    #: gram: the rank of each matrix stored factored
    factored_ranks: list[int] = field(default_factory=list)


def write_score_file(
    output_path: Path, accumulator, loaded, metadata, options, count: int
) -> Written:
    """Check the scores, name them as the checkpoint does, write the file atomically."""
    scores = accumulator.scores(count)
    no_relevance = check_scores(scores, accumulator.seen, output_path)
    scores = {name: value for name, value in scores.items() if name not in no_relevance}
    scores = checkpoint_layout(loaded.net, scores, loaded.converted)
    aliases = {a: s for a, s in loaded.aliases.items() if s in scores}
    metadata = replace(metadata, aliases=aliases)
    write_scores(output_path, scores, metadata, dtype=DTYPES[options.score_dtype])
    unscored = sorted(set(loaded.tensor_files) - set(scores) - set(aliases))
    matrices = [name for name in unscored if len(_stored_shape(loaded.tensor_files, name)) > 1]
    return Written(unscored, matrices, no_relevance)


def write_gram_file(
    output_path: Path, grams: dict, accumulator, loaded, metadata, options
) -> Written:
    """Check the Gram matrices ``grams`` (stored name -> mean matrix, or its factored
    form when several processes combined factors), record which weight reads which, write
    the file atomically."""
    weighting = options.signal.token_weighting
    for name, value in grams.items():
        parts = (value.factor, value.diagonal) if isinstance(value, Factored) else (value,)
        if not all(torch.isfinite(part).all() for part in parts):
            raise ComputeError(
                f"the Gram matrix {name!r} is not finite (NaN or Inf); {output_path} was not "
                "written. Try --dtype float32"
            )
        if not any(part.any() for part in parts):
            hint = (
                " (--token-weighting answer weights only the tokens the next-token target "
                "scores: prompts of one token, or chats whose answer is cut off, have none)"
                if weighting == "answer"
                else ""
            )
            raise ComputeError(
                f"the Gram matrix {name!r} is zero: no token of these prompts gave that "
                f"layer an input{hint}; {output_path} was not written. Check the prompts"
            )
    tensors, factored = stored_grams(grams, options)
    metadata = replace(
        metadata, gram_of=dict(accumulator.gram_of), gram_factored=factored, aliases={}
    )
    dtype = DTYPES[options.score_dtype]
    write_scores(output_path, tensors, metadata, dtype=dtype)
    size = sum(value.numel() for value in tensors.values()) * dtype.itemsize
    reasons = dict(accumulator.unhooked)
    for name in loaded.converted:
        reasons[name] = "fused on load (experts), not nn.Linear"
    without: dict[str, list[str]] = {}
    for name in sorted(set(loaded.tensor_files) - set(accumulator.gram_of)):
        if len(_stored_shape(loaded.tensor_files, name)) < 2:
            continue
        reason = reasons.get(_owner(name, loaded), "not used by the model class")
        without.setdefault(reason, []).append(name)
    unscored = sorted(set(loaded.tensor_files) - set(accumulator.gram_of))
    matrices = [n for reason_names in without.values() for n in reason_names]
    ranks = [form["rank"] for form in factored.values()]
    return Written(unscored, sorted(matrices), [], without, (len(grams), size), ranks)


def stored_grams(grams: dict[str, torch.Tensor], options) -> tuple[dict, dict]:
    """The tensors to write for ``grams`` under ``--gram-form`` and the ``gram_factored``
    metadata: each matrix whole, or factored where that is smaller (scores.gram_forms)."""
    if options.gram_form == "dense":
        return grams, {}
    return factored_tensors(grams, options.gram_tolerance, options.gram_max_rank)


def _owner(name: str, loaded) -> str:
    """The score name holding checkpoint tensor ``name`` (a fused parameter's, an alias's
    storage, or its own)."""
    for fused, parts in loaded.converted.items():
        if name in parts:
            return fused
    return loaded.aliases.get(name, name)


def _stored_shape(tensor_files: dict[str, str], name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(tensor_files[name], framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def check_scores(scores: dict[str, torch.Tensor], seen: set[str], output: Path) -> list[str]:
    """Refuse scores that would make a merge arbitrary; return the tensors to leave out.

    Non-finite scores stop the run with no file written, and so do matrices whose scores
    are zero everywhere although gradients reached them: the model's output did not
    depend on them for these prompts (a tokenizer that turned every prompt into padding,
    a model that ignores its input), so a merge would rank their entries by index order.
    Tensors that no gradient reached (MoE routers, which AttnLRP treats as constants) and
    all-zero vectors are left out of the file: a merge then needs ``missing_scores``.
    """
    for name, value in scores.items():
        if not torch.isfinite(value).all():
            raise ComputeError(
                f"scores of {name!r} are not finite (NaN or Inf); {output} was not written. "
                "Try --dtype float32"
            )
    zero = sorted(name for name, value in scores.items() if not value.any())
    dead = [name for name in zero if name in seen and scores[name].ndim >= 2]
    if dead or len(zero) == len(scores):
        shown = ", ".join(dead[:3] or zero[:3])
        raise ComputeError(
            f"the scores of {len(dead) or len(zero)} tensor(s) are zero everywhere ({shown}, "
            f"...), so their entries cannot be ranked; {output} was not written. The model's "
            "output does not depend on them for these prompts: check that the tokenizer fits "
            "the model and that the prompts are not empty or all padding"
        )
    return zero

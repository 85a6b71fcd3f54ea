"""The ``lrp`` merge method: keep each task vector's most relevant entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (see :mod:`mergekit_lrp.score_file`); the top ``density`` fraction
of delta_m by importance is kept, the rest zeroed; then
merged = theta_base + sum_m weight_m * masked delta_m, optionally with TIES sign
election (mergekit's own helper) and normalisation by the summed weights.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import lru_cache

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method
from mergekit.merge_methods.generalized_task_arithmetic import get_mask as sign_consensus_mask

from mergekit_lrp.registration import register_if_registry_loaded
from mergekit_lrp.score_file import ScoreReader
from mergekit_lrp.selection import kept_count, top_k_mask

IMPORTANCE_MODES = ("weight", "delta")
CONSENSUS_MODES = ("none", "sum", "count")
MISSING_SCORES_MODES = ("error", "magnitude", "base")


class LRPConfigError(ValueError):
    """An ``lrp`` parameter is out of range or a model has no usable scores."""


@lru_cache(maxsize=64)
def open_scores(path: str) -> ScoreReader:
    """Each score file's header is read and validated once per merge, not once per tensor."""
    return ScoreReader(path)


def check_model_parameters(model: Hashable, weight: float, density: float) -> None:
    if not 0 < density <= 1:
        raise LRPConfigError(f"lrp: density for {model} must be in (0, 1], got {density}")
    if weight < 0:
        raise LRPConfigError(f"lrp: weight for {model} must not be negative, got {weight}")


def check_shared_parameters(importance: str, consensus: str, missing_scores: str) -> None:
    for name, value, allowed in (
        ("importance", importance, IMPORTANCE_MODES),
        ("consensus", consensus, CONSENSUS_MODES),
        ("missing_scores", missing_scores, MISSING_SCORES_MODES),
    ):
        if value not in allowed:
            raise LRPConfigError(f"lrp: {name} must be one of {', '.join(allowed)}; got {value!r}")


def is_protected(group: TensorGroup) -> bool:
    """Norms, biases (1-D) and embeddings / lm_head (vocabulary-indexed) tensors."""
    return group.base.tensor.ndim < 2 or group.metadata.vocabulary_axis is not None


def task_vector_importance(
    model: Hashable,
    theta: torch.Tensor,
    delta: torch.Tensor,
    name: str,
    scores_path: str | None,
    importance: str,
    missing_scores: str,
) -> torch.Tensor | None:
    """Importance of each delta entry, or None when the delta is dropped (``base``)."""
    reader = open_scores(scores_path) if scores_path else None
    scores = None
    if reader is not None and reader.resolve(name) is None:
        scores = converted_scores(reader, name, delta.shape)
    if reader is None or (reader.resolve(name) is None and scores is None):
        where = (
            f"model {model} has no lrp_scores"
            if reader is None
            else f"score file {scores_path} has no scores for tensor {name!r} (model {model})"
        )
        if missing_scores == "error":
            raise LRPConfigError(
                f"lrp: {where}. Compute them with lrp-compute, or set missing_scores: "
                "magnitude (use |delta|) or base (keep the base weight for this model)"
            )
        return delta.abs().float() if missing_scores == "magnitude" else None
    if scores is None:
        scores = reader.get(name, shape=delta.shape)
    scores = scores.to(delta.device)
    source = theta if importance == "weight" else delta
    return source.abs().float() * scores


def converted_scores(reader: ScoreReader, name: str, shape) -> torch.Tensor | None:
    """Scores for a tensor mergekit assembles on load from several checkpoint tensors.

    With transformers 5, mergekit merges e.g. MoE experts in the fused model layout
    (``mlp.experts.gate_up_proj``) while checkpoints and score files store them per expert;
    the score tensors are assembled by the same conversion mergekit applies to the weights.
    None if the score file's tensors cannot produce ``name``.
    """
    from mergekit.architecture.conversion import (
        can_convert_checkpoint_keys,
        convert_checkpoint_tensors,
    )

    model_type = reader.metadata.model_type
    if not can_convert_checkpoint_keys(model_type, reader.names(), name):
        return None
    sources = {stored: (lambda stored=stored: reader.get(stored)) for stored in reader.names()}
    scores = convert_checkpoint_tensors(model_type, sources, name)
    if scores is None:
        return None
    if tuple(scores.shape) != tuple(shape):
        raise LRPConfigError(
            f"lrp: scores assembled for {name!r} from {reader.path} have shape "
            f"{tuple(scores.shape)}, the weight has {tuple(shape)}"
        )
    return scores.float()


@merge_method(
    name="lrp",
    pretty_name="LRP (AttnLRP relevance-guided task vectors)",
    reference_url="https://arxiv.org/abs/2402.05602",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def lrp_merge(
    group: TensorGroup,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[float] = 0.3,
    lrp_scores: PerNonBase[str | None] = None,
    importance: str = "delta",
    rescale: bool = False,
    consensus: str = "none",
    normalize: bool = False,
    protect_special: bool = True,
    missing_scores: str = "error",
) -> torch.Tensor:
    check_shared_parameters(importance, consensus, missing_scores)
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    protected = protect_special and is_protected(group)
    deltas, weights = [], []
    for entry in group.non_base:
        check_model_parameters(entry.id, weight[entry.id], density[entry.id])
        delta = entry.tensor - base
        keep = 1.0 if protected else density[entry.id]
        if keep < 1:
            scores_path = _lookup(lrp_scores, entry.id)
            imp = task_vector_importance(
                entry.id, entry.tensor, delta, name, scores_path, importance, missing_scores
            )
            if imp is None:
                continue
            delta = delta * top_k_mask(imp, kept_count(keep, delta.numel()))
            del imp
            if rescale:
                delta = delta / keep
        deltas.append(delta)
        weights.append(weight[entry.id])
    if not deltas:
        return base

    stacked = torch.stack(deltas)
    del deltas
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.reshape(-1, *([1] * base.ndim))
    stacked.mul_(w)
    if consensus != "none":
        agree = sign_consensus_mask(stacked, method=consensus, mask_dtype=stacked.dtype)
        mixed = (stacked * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)


def _lookup(values: Mapping[Hashable, str | None], key: Hashable) -> str | None:
    value = values.get(key)
    return str(value) if value else None


# mergekit's registry may have been imported by this very module (see registration.py)
register_if_registry_loaded()

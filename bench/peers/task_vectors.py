"""What the three peers share: each model's task vector of one tensor, which tensors are
a layer's weight matrix, and the rule for the rest (the weighted mean of the changes)."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: 2-D tensors that are not a layer's linear map: the vocabulary matrices, which the
#: reference implementations for LLMs leave to the mean of the changes
VOCABULARY = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte")


#: a peer's merged change of one layer matrix: (base, changes, weights, tensor name)
LayerChange = Callable[[torch.Tensor, list[torch.Tensor], list[float], str], torch.Tensor]


def merge_tensor(group, weight, layer_change: LayerChange) -> torch.Tensor:
    """One tensor of a peer's merge: the base plus ``layer_change`` for a layer matrix
    that some fine-tune changed, plus the weighted mean of the changes otherwise."""
    base = group.base.tensor.float()
    models = list(group.non_base)
    if not models:
        return group.base.tensor
    deltas = [entry.tensor.float() - base for entry in models]
    weights = [float(weight[entry.id]) for entry in models]
    name = group.metadata.name or ""
    if is_layer_matrix(name, base) and any(d.any() for d in deltas):
        change = layer_change(base, deltas, weights, name)
    else:
        change = mean_change(deltas, weights)
    return (base + change).to(group.base.tensor.dtype)


def is_layer_matrix(name: str, tensor: torch.Tensor) -> bool:
    return tensor.ndim == 2 and not any(part in name for part in VOCABULARY)


def mean_change(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weight_i * delta_i / N: at weight 1 the mean of the changes."""
    return sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)

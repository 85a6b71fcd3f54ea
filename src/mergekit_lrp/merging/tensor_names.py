"""What a checkpoint tensor's name says: its layer, its module kind, and whether the merge
keeps it whole (``protect_special``). One parser for the kernel, the budgets and
``lrp-inspect``.
"""

from __future__ import annotations

import re

KINDS = ("attention", "mlp", "embeddings", "norms", "other")

#: a layer of a stack: ``model.layers.3.``, ``mtp.layers.0.``, ``visual.blocks.7.``
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|layer)\.(\d+))\.")
# checked in this order: a q_norm inside self_attn is a norm, an expert's proj is MLP
_RULES = (
    ("norms", re.compile(r"(norm|ln_\d|ln_f|layernorm)", re.IGNORECASE)),
    ("embeddings", re.compile(r"(embed|lm_head|wte|wpe)")),
    ("attention", re.compile(r"(attn|attention|\.[qkvo]_proj|\.qkv_proj|\.in_proj)")),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|experts|\.gate_proj|\.up_proj|\.down_proj)")),
)
#: modules whose weight is indexed by the vocabulary (input embeddings, output heads)
VOCABULARY_MODULES = ("embed_tokens", "lm_head", "embed_in", "embed_out", "wte")


def module_kind(name: str) -> str:
    """One of :data:`KINDS` for a checkpoint tensor name.

    >>> module_kind("model.layers.3.self_attn.q_proj.weight")
    'attention'
    """
    for kind, pattern in _RULES:
        if pattern.search(name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    """The index of the layer a tensor belongs to, or None (embeddings, final norm, head).

    >>> layer_index("model.layers.12.mlp.up_proj.weight")
    12
    """
    match = _LAYER.match(name)
    return int(match.group(2)) if match else None


def layer_of(name: str) -> str | None:
    """The layer a tensor belongs to, named with its stack (``model.layers.3``), so that
    layers of different stacks (MTP, a vision tower) stay apart; None outside layers."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def is_vocabulary_tensor(name: str) -> bool:
    """An input embedding or output head, by the module that owns the tensor."""
    parts = name.split(".")
    return any(part in VOCABULARY_MODULES for part in parts[:-1])


def is_protected(name: str, ndim: int, vocabulary_axis: int | None = None) -> bool:
    """What ``protect_special: true`` keeps whole: 1-D tensors (norms, biases) and tensors
    indexed by the vocabulary (embeddings, output heads). ``vocabulary_axis`` is what
    mergekit's architecture says when merging; without it the name decides."""
    return ndim < 2 or vocabulary_axis is not None or is_vocabulary_tensor(name)

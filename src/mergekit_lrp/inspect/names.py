"""Where a tensor sits, from its name alone: its layer and its module kind."""

from __future__ import annotations

import re

KINDS = ("attention", "mlp", "embeddings", "norms", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# checked in this order: a q_norm inside self_attn is a norm, an expert's proj is MLP
_RULES = (
    ("norms", re.compile(r"(norm|ln_\d|ln_f|layernorm)", re.IGNORECASE)),
    ("embeddings", re.compile(r"(embed|lm_head|wte|wpe)")),
    ("attention", re.compile(r"(attn|attention|\.[qkvo]_proj|\.qkv_proj|\.in_proj)")),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|experts|\.gate_proj|\.up_proj|\.down_proj)")),
)


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
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, head).

    >>> layer_index("model.layers.12.mlp.up_proj.weight")
    12
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None

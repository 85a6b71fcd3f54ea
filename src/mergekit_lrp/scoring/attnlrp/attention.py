"""Attention under AttnLRP, plugged into transformers' attention registry.

Registered process-wide under a private name in ``AttentionInterface`` and, with
transformers' eager mask builder, in ``AttentionMaskInterface``: for an implementation
name without a mask builder, transformers builds no mask at all (no causality, no
padding). Only models whose config names this implementation use it.
"""

import functools

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from mergekit_lrp.scoring.attnlrp.forwards import softcap as softcap_scores
from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

ATTENTION_IMPLEMENTATION = "mergekit_lrp_attnlrp"


def attnlrp_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention computed like transformers' own, with the AttnLRP rules.

    Uniform rule on both matrix products (q.k^T and weights.v), identity rule on Gemma's
    logit soft-capping, plain gradient through the softmax (gradient x input there is
    AttnLRP's softmax rule). Without soft-capping this runs on the fused kernel. Rotary
    embeddings and the scaling are linear and need no rule. Dropout and sliding-window
    arguments are ignored: no dropout in relevance, and the window is already in the mask.
    """
    lxt = load_lxt_rules()
    if scaling is None:
        scaling = module.head_dim**-0.5
    if softcap is None:
        return _fused(module, query, key, value, attention_mask, scaling, lxt)
    groups = module.num_key_value_groups
    key = torch.repeat_interleave(key, groups, dim=1)
    value = torch.repeat_interleave(value, groups, dim=1)

    scores = lxt.divide_gradient(torch.matmul(query, key.transpose(2, 3)), 2) * scaling
    scores = lxt.identity_rule_implicit(functools.partial(softcap_scores, cap=softcap), scores)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = lxt.divide_gradient(torch.matmul(weights, value), 2)
    return output.transpose(1, 2).contiguous(), weights


def _fused(module, query, key, value, attention_mask, scaling, lxt):
    """The same rules on PyTorch's fused attention (no attention matrix kept for backward).

    Every gradient below the products is linear in the output gradient, so halving it at
    weights.v and again at q.k^T (through a plain softmax gradient) is the same as scaling
    the fused kernel's gradients: 1/2 for v, 1/4 for q and k.
    """
    output, _ = sdpa_attention_forward(
        module,
        lxt.divide_gradient(query, 4),
        lxt.divide_gradient(key, 4),
        lxt.divide_gradient(value, 2),
        attention_mask,
        scaling=scaling,
        dropout=0.0,
        is_causal=False,  # the mask decides, as in the eager path
    )
    return output, None


def register_attnlrp_attention() -> None:
    """Make ``ATTENTION_IMPLEMENTATION`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attnlrp_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)

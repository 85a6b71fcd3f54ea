"""Rule-applying ``forward`` replacements, bound to single module instances.

Each keeps the original forward's arithmetic operation for operation, so the forward
values are unchanged; only the backward pass differs. With gradient x input read out
afterwards, the modified backward yields AttnLRP relevance (Achtibat et al., 2024):

* identity rule on element-wise nonlinearities (activation, tanh soft-capping);
* uniform rule on multiplicative interactions: the gradient into each factor is halved;
* normalisation: the 1/rms factor is a constant (no gradient through the denominator).
"""

import functools

import torch
from torch import nn

from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules


def llama_rms_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama-style RMSNorm, ``weight * (x / rms(x))`` (Llama, Mistral, Qwen2/3, Phi3)."""
    lxt = load_lxt_rules()
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    inverse_rms = lxt.stop_gradient(torch.rsqrt(variance + self.variance_epsilon))
    return self.weight * (hidden_states * inverse_rms).to(input_dtype)


def gemma_rms_norm(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma-style RMSNorm, ``(1 + weight) * (x / rms(x))`` computed in float32."""
    lxt = load_lxt_rules()
    x32 = x.float()
    inverse_rms = lxt.stop_gradient(torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))
    return (x32 * inverse_rms * (1.0 + self.weight.float())).type_as(x)


def gated_mlp(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` with separate gate and up projections."""
    lxt = load_lxt_rules()
    activated = lxt.identity_rule_implicit(self.act_fn, self.gate_proj(x))
    return self.down_proj(lxt.divide_gradient(activated * self.up_proj(x), 2))


def fused_gated_mlp(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Phi3's MLP: one ``gate_up_proj`` whose output halves are gate and up."""
    lxt = load_lxt_rules()
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    activated = lxt.identity_rule_implicit(self.activation_fn, gate)
    return self.down_proj(lxt.divide_gradient(up * activated, 2))


def no_dropout(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dropout off: relevance explains the deterministic model, also in train mode."""
    return x


def softcap(scores: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's soft-capping ``cap * tanh(x / cap)``, in the same operation order."""
    return torch.tanh(scores / cap) * cap


def softcapped_head(self: nn.Module, hidden_states: torch.Tensor, cap: float) -> torch.Tensor:
    """LM head then final-logit soft-capping under the identity rule.

    The model's own forward applies this capping inline, where no rule can reach it; while
    this forward is installed, the model's config copy has that capping switched off.
    """
    logits = type(self).forward(self, hidden_states)
    capping = functools.partial(softcap, cap=cap)
    return load_lxt_rules().identity_rule_implicit(capping, logits)

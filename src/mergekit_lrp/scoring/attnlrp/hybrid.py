"""Rule-applying forwards for the hybrid Qwen3.5 / Qwen3-Next layers (see docs/hybrid.md).

Qwen3.5 (``qwen3_5``, ``qwen3_5_text``) and Qwen3-Next (``qwen3_next``) alternate gated
delta-rule linear attention (``*GatedDeltaNet``) with gated full attention; Qwen3-Next
adds sparse MoE blocks. The forwards below repeat transformers' arithmetic and add the
AttnLRP rules:

* identity rule on element-wise nonlinearities (SiLU after the causal convolution, the
  sigmoid of beta and of the output gates, softplus and exp of the decay; the sigmoids
  and the softplus epsilon-stabilised, see ``_StabilisedIdentity``);
* uniform rule (half of the relevance to each factor) on every product of two
  input-dependent factors: output gate x attention output, beta x value, decay x state,
  state x key, key (outer) delta, state x query, SiLU(z) x normalised output;
* normalisation denominators (RMS, the L2 norm of q and k) and MoE routing weights are
  constants (detached).

The delta-rule recurrence is computed token by token, in the operation order of
transformers' ``torch_recurrent_gated_delta_rule``; prefill in transformers uses the
mathematically equal chunked form, whose triangular solve has no place for the rules.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

# Stabiliser of the identity rule on functions with f(0) != 0 (sigmoid, softplus).
GATE_EPSILON = 1e-2


class _StabilisedIdentity(torch.autograd.Function):
    """Identity rule ``R_x = R_y`` for ``y = fn(x)``, epsilon-stabilised at ``x = 0``.

    The identity rule makes the gradient ``fn(x) / x``; for functions that are not 0 at 0
    (sigmoid, softplus) it diverges as ``x -> 0``, and so do the epsilon-0 relevances of
    the linear layer computing ``x`` (entries ``W_ij x_j / x_i``). The denominator becomes
    ``x + eps * sign(x)`` (the epsilon rule's stabiliser): ``R_x = x / (x + eps sign x) R_y``,
    conservative up to a share ``~eps / |x|``.
    """

    @staticmethod
    def forward(ctx, fn, x, eps):
        y = fn(x)
        if x.requires_grad:
            sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
            ctx.save_for_backward(y / (x + eps * sign))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio, None


def stabilised_identity(fn, x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Identity rule on ``fn(x)`` with the epsilon stabiliser (see ``_StabilisedIdentity``)."""
    return _StabilisedIdentity.apply(fn, x, GATE_EPSILON if eps is None else eps)


def gated_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qwen3.5 / Qwen3-Next attention: ``o_proj(attention * sigmoid(gate))``.

    ``q_proj`` yields query and gate; q_norm / k_norm are patched norm instances; the
    attention function is the registered AttnLRP one (the config copy names it). The
    output gate gets the identity rule on its sigmoid and the uniform rule on the product.
    """
    lxt = load_lxt_rules()
    modeling = sys.modules[type(self).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query_states, gate = torch.chunk(
        self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim * 2), 2, dim=-1
    )
    gate = gate.reshape(*input_shape, -1)

    query_states = self.q_norm(query_states.view(hidden_shape)).transpose(1, 2)
    key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    gate = stabilised_identity(torch.sigmoid, gate)
    attn_output = lxt.divide_gradient(attn_output * gate, 2)
    return self.o_proj(attn_output), attn_weights


def gated_rms_norm(
    self: nn.Module, hidden_states: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``weight * x / rms(x) * silu(gate)``: 1/rms detached, identity rule on the SiLU,
    uniform rule on the product (both factors depend on the input)."""
    lxt = load_lxt_rules()
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    inverse_rms = lxt.stop_gradient(torch.rsqrt(variance + self.variance_epsilon))
    hidden_states = hidden_states * inverse_rms
    hidden_states = self.weight * hidden_states.to(input_dtype)
    activated = lxt.identity_rule_implicit(F.silu, gate.to(torch.float32))
    hidden_states = lxt.divide_gradient(hidden_states * activated, 2)
    return hidden_states.to(input_dtype)


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """transformers' ``l2norm`` with the denominator as a constant (normalisation rule)."""
    inverse_norm = load_lxt_rules().stop_gradient(
        torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)
    )
    return x * inverse_norm


def gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule, token by token, with the AttnLRP rules.

    Shapes as in transformers: query/key ``[batch, seq, k_heads, d_k]``, value
    ``[batch, seq, v_heads, d_v]``, g (log decay) and beta (already ``sigmoid(b)`` under
    the identity rule) ``[batch, seq, v_heads]``. Per step, with S the ``[d_k, d_v]``
    state of a head::

        S <- exp(g_t) S                  uniform rule (decay x state)
        m  = S^T k_t                     uniform rule (state x key)
        d  = beta_t (v_t - m)            uniform rule (beta x value); the difference is a sum
        S <- S + k_t d^T                 uniform rule (key x delta); the sum passes on
        o_t = S^T q_t                    uniform rule (state x query)

    q and k are L2-normalised with constant denominators and q is scaled by
    ``d_k ** -0.5`` (linear); ``exp`` of the log decay gets the identity rule.
    """
    lxt = load_lxt_rules()
    half = lxt.divide_gradient
    initial_dtype = query.dtype
    batch_size, sequence_length, num_k_heads, k_head_dim = key.shape
    num_v_heads, v_head_dim = value.shape[-2:]
    if num_k_heads != num_v_heads:
        query = query.repeat_interleave(num_v_heads // num_k_heads, dim=2)
        key = key.repeat_interleave(num_v_heads // num_k_heads, dim=2)
    query, key, value, beta, g = [
        x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        for x in (query, key, value, beta, g)
    ]
    query = l2_normalise(query)
    key = l2_normalise(key)
    query = query / (query.shape[-1] ** 0.5)
    decay = lxt.identity_rule_implicit(torch.exp, g)

    if initial_state is None:
        state = torch.zeros(
            (batch_size, num_v_heads, k_head_dim, v_head_dim),
            dtype=value.dtype,
            device=value.device,
        )
    else:
        state = initial_state.to(value)
    outputs = []
    for i in range(sequence_length):
        q_t, k_t, v_t = query[:, :, i], key[:, :, i], value[:, :, i]
        state = half(state * decay[:, :, i][..., None, None], 2)
        kv_mem = half((state * k_t.unsqueeze(-1)).sum(dim=-2), 2)
        delta = half((v_t - kv_mem) * beta[:, :, i].unsqueeze(-1), 2)
        state = state + half(k_t.unsqueeze(-1) * delta.unsqueeze(-2), 2)
        outputs.append(half((state * q_t.unsqueeze(-1)).sum(dim=-2), 2))
    core_attn_out = torch.stack(outputs, dim=2) if outputs else torch.zeros_like(value)
    final_state = state if output_final_state else None
    return core_attn_out.transpose(1, 2).contiguous().to(initial_dtype), final_state


def causal_convolution(self: nn.Module, mixed_qkv: torch.Tensor, conv_state=None) -> torch.Tensor:
    """Depthwise causal conv1d (linear in input and weight) then the identity rule on its
    activation; ``conv_state`` given: transformers' single-token cached update."""
    lxt = load_lxt_rules()
    weight = self.conv1d.weight.squeeze(1)
    bias = self.conv1d.bias
    hidden_size, seq_len = mixed_qkv.shape[1], mixed_qkv.shape[-1]
    if conv_state is not None:
        state_len = conv_state.shape[-1]
        full = torch.cat([conv_state, mixed_qkv], dim=-1).to(weight.dtype)
        conv_state.copy_(full[:, :, -state_len:])
        out = F.conv1d(full, weight.unsqueeze(1), bias, padding=0, groups=hidden_size)
        out = out[:, :, -seq_len:]
    else:
        out = F.conv1d(
            mixed_qkv.to(weight.dtype),
            weight=weight.unsqueeze(1),
            bias=bias,
            padding=weight.shape[-1] - 1,
            groups=hidden_size,
        )[:, :, :seq_len]
    if self.activation is not None:
        out = lxt.identity_rule_implicit(_activation(self.activation), out)
    return out.to(mixed_qkv.dtype)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _projections(self: nn.Module, hidden_states: torch.Tensor):
    """(mixed q|k|v, z, b, a) for Qwen3.5's separate projections or Qwen3-Next's fused ones."""
    batch_size, seq_len, _ = hidden_states.shape
    if hasattr(self, "in_proj_qkvz"):  # Qwen3-Next
        query, key, value, z, b, a = self.fix_query_key_value_ordering(
            self.in_proj_qkvz(hidden_states), self.in_proj_ba(hidden_states)
        )
        query, key, value = (x.reshape(x.shape[0], x.shape[1], -1) for x in (query, key, value))
        return torch.cat((query, key, value), dim=-1), z, b, a
    mixed_qkv = self.in_proj_qkv(hidden_states)
    z = self.in_proj_z(hidden_states).reshape(batch_size, seq_len, -1, self.head_v_dim)
    return mixed_qkv, z, self.in_proj_b(hidden_states), self.in_proj_a(hidden_states)


def gated_delta_net(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cache_params=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``*GatedDeltaNet.forward`` with the rules (cache handling as in transformers).

    Padding positions are zeroed (a constant mask); the projections, the convolution and
    ``out_proj`` are linear; ``beta = sigmoid(b)`` and ``softplus(a + dt_bias)`` get the
    identity rule; ``-exp(A_log)`` is a parameter-only factor (plain gradient, like a
    weight); the recurrence is :func:`gated_delta_rule`; ``norm`` is the patched
    gated RMSNorm.
    """
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    batch_size, seq_len, _ = hidden_states.shape
    if cache_params is not None:
        conv_state = cache_params.get_conv_state(self.layer_idx, state_idx=0)
        recurrent_state = cache_params.get_recurrent_state(self.layer_idx, state_idx=0)
    else:
        conv_state, recurrent_state = None, None

    mixed_qkv, z, b, a = _projections(self, hidden_states)
    mixed_qkv = mixed_qkv.transpose(1, 2)
    if (
        conv_state is not None
        and seq_len == 1
        and not cache_params.is_recording_past(self.layer_idx)
    ):
        mixed_qkv = causal_convolution(self, mixed_qkv, conv_state)
    else:
        if cache_params is not None:
            mixed_qkv = cache_params.update_conv_state(
                mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size
            )
        mixed_qkv = causal_convolution(self, mixed_qkv)
        if cache_params is not None:
            mixed_qkv = mixed_qkv[:, :, -seq_len:]
    mixed_qkv = mixed_qkv.transpose(1, 2)
    query, key, value = torch.split(mixed_qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(batch_size, seq_len, -1, self.head_k_dim)
    key = key.reshape(batch_size, seq_len, -1, self.head_k_dim)
    value = value.reshape(batch_size, seq_len, -1, self.head_v_dim)

    beta = stabilised_identity(torch.sigmoid, b)
    g = -self.A_log.float().exp() * stabilised_identity(F.softplus, a.float() + self.dt_bias)
    core_attn_out, last_state = gated_delta_rule(
        query,
        key,
        value,
        g=g,
        beta=beta,
        initial_state=recurrent_state,
        output_final_state=cache_params is not None,
    )
    if cache_params is not None:
        cache_params.update_recurrent_state(last_state, self.layer_idx)

    core_attn_out = core_attn_out.reshape(-1, self.head_v_dim)
    z = z.reshape(-1, self.head_v_dim)
    core_attn_out = self.norm(core_attn_out, z)
    core_attn_out = core_attn_out.reshape(batch_size, seq_len, -1)
    return self.out_proj(core_attn_out)


def sparse_moe_block(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next / Qwen3.5-MoE sparse MoE block with the rules.

    The router (softmax, top-k, renormalisation) runs as in transformers, but its routing
    weights are constants: relevance reaches the input through the expert outputs only,
    not through the router (no relevance through softmax gates), so ``mlp.gate.weight``
    gets none. Each expert is a gated MLP (identity rule on the activation, uniform rule
    on ``act(gate) * up``); the shared expert is the patched MLP instance; its sigmoid
    gate gets the identity rule and the uniform rule on ``sigmoid(.) * shared``.
    """
    lxt = load_lxt_rules()
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    shared_output = self.shared_expert(flat)
    _, routing_weights, selected_experts = self.gate(flat)
    expert_output = _experts(self.experts, flat, selected_experts, routing_weights.detach())
    shared_gate = stabilised_identity(torch.sigmoid, self.shared_expert_gate(flat))
    shared_output = lxt.divide_gradient(shared_gate * shared_output, 2)
    return (expert_output + shared_output).reshape(batch_size, sequence_length, hidden_dim)


def _experts(experts: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' eager expert loop over the fused ``gate_up_proj`` / ``down_proj``."""
    lxt = load_lxt_rules()
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit[:, 0].tolist():
        if expert == experts.num_experts:
            continue
        top_k_pos, token_idx = torch.where(mask[expert])
        gate, up = F.linear(hidden_states[token_idx], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        activated = lxt.identity_rule_implicit(experts.act_fn, gate)
        current = F.linear(lxt.divide_gradient(activated * up, 2), experts.down_proj[expert])
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final = final.index_add(0, token_idx, current.to(final.dtype))
    return final

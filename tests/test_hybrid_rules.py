"""On hybrid models the AttnLRP rules keep the forward pass and reach every language parameter."""

# rule derivations: docs/hybrid.md

import pytest
import torch
from helpers import PROMPT, relevance
from tiny_models import make_tiny_hybrid, make_tiny_qwen3_5_multimodal
from transformers.models.qwen3_5 import modeling_qwen3_5

from mergekit_lrp.scoring.attnlrp import attnlrp_rules, hybrid

torch.set_num_threads(1)




BUILDERS = {
    "qwen3_5_text": lambda: make_tiny_hybrid("qwen3_5_text"),
    "qwen3_next": lambda: make_tiny_hybrid("qwen3_next"),
    "qwen3_5": make_tiny_qwen3_5_multimodal,
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_hybrid_rules_keep_logits_and_reach_every_language_parameter(kind):
    """Forward unchanged; every language-model parameter gets finite, nonzero relevance,
    except the MoE routers (routing weights are constants by design); the vision tower is
    not part of a text pass."""
    model = BUILDERS[kind]()
    plain = model(PROMPT).logits
    with attnlrp_rules(model):
        patched = model(PROMPT).logits
    # the rules compute the delta rule token by token, transformers in chunks: equal up to
    # float32 rounding (measured max |difference| <= 1e-7 on these models)
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(PROMPT).logits, plain)  # restored

    target, inputs, parameters = relevance(model, PROMPT)
    assert torch.isfinite(target) and torch.isfinite(inputs).all()
    names = [n for n, _ in model.named_parameters() if ".visual." not in n]
    routers = {n for n in names if n.endswith("mlp.gate.weight")}
    assert bool(routers) == (kind == "qwen3_next")
    assert set(parameters) == set(names) - routers  # routers: no gradient path at all
    for name, value in parameters.items():
        assert torch.isfinite(value).all() and value.abs().sum() > 0, name


def test_left_padding_does_not_change_relevance():
    """Padding is zeroed before the convolution and the recurrence: relevance unchanged."""
    model = make_tiny_hybrid("qwen3_next")
    target, inputs, parameters = relevance(model, PROMPT)
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), PROMPT], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(PROMPT)], 1)
    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids)
    embeddings.retain_grad()
    with attnlrp_rules(model):
        padded = model(inputs_embeds=embeddings, attention_mask=mask).logits[0, -1].max()
        padded.backward()
    torch.testing.assert_close(padded.detach(), target)
    torch.testing.assert_close((embeddings * embeddings.grad)[:, 3:], inputs, rtol=1e-4, atol=1e-6)
    for name, p in model.named_parameters():
        if name in parameters:
            torch.testing.assert_close(p * p.grad, parameters[name], rtol=1e-4, atol=1e-6)


def test_delta_rule_forward_is_transformers_recurrent_kernel():
    """Same operations as transformers' recurrent reference: bit-identical values."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 6, 2, 8, generator=generator) for _ in "qk")
    v = torch.randn(1, 6, 4, 8, generator=generator)
    g = -torch.rand(1, 6, 4, generator=generator)
    beta = torch.rand(1, 6, 4, generator=generator)
    reference, _ = modeling_qwen3_5.torch_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True
    )
    chunked, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True
    )
    ours, _ = hybrid.gated_delta_rule(q, k, v, g=g, beta=beta)
    assert torch.equal(ours, reference)
    torch.testing.assert_close(ours, chunked, rtol=1e-5, atol=1e-6)

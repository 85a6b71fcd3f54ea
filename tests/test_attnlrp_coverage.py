"""AttnLRP gives every parameter and input relevance, whatever padding, checkpointing, dtype."""


import pytest
import torch
from helpers import PROMPT, relevance, untouched_state
from tiny_models import make_tiny_gemma3_multimodal, make_tiny_model

from mergekit_lrp.scoring.attnlrp import SUPPORTED_MODEL_TYPES, attnlrp_rules

torch.set_num_threads(1)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_every_parameter_and_input_gets_relevance(model_type):
    model = make_tiny_model(model_type)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    plain_logits = model(PROMPT).logits
    with attnlrp_rules(model):
        patched_logits = model(PROMPT).logits
    # the rules change the backward pass only (this also checks the causal/sliding mask)
    torch.testing.assert_close(patched_logits, plain_logits, rtol=1e-5, atol=1e-5)

    target, inputs, parameters = relevance(model, PROMPT)
    assert torch.isfinite(target)
    assert torch.isfinite(inputs).all() and inputs.abs().sum() > 0
    assert set(parameters) == {name for name, _ in model.named_parameters()}
    for name, value in parameters.items():
        assert torch.isfinite(value).all(), name
        assert value.abs().sum() > 0, name


def test_gemma3_multimodal_language_model():
    model = make_tiny_gemma3_multimodal()
    plain_logits = model(PROMPT).logits
    before = untouched_state(model)
    with attnlrp_rules(model):
        patched_logits = model(PROMPT).logits
    torch.testing.assert_close(patched_logits, plain_logits, rtol=1e-5, atol=1e-5)

    _, inputs, parameters = relevance(model, PROMPT)
    assert torch.isfinite(inputs).all() and inputs.abs().sum() > 0
    language = [n for n, _ in model.named_parameters() if ".language_model." in n]
    assert language and all(parameters[n].abs().sum() > 0 for n in language)
    assert untouched_state(model) == before
    assert torch.equal(model(PROMPT).logits, plain_logits)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type", ["llama", "gemma3", "phi3"])
def test_padding_does_not_change_relevance(model_type, side):
    model = make_tiny_model(model_type)
    target, inputs, parameters = relevance(model, PROMPT)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones_like(PROMPT), torch.zeros_like(pad)
    if side == "left":
        ids, mask, real = torch.cat([pad, PROMPT], 1), torch.cat([zeros, ones], 1), slice(3, None)
        position = -1
    else:
        ids, mask, real = torch.cat([PROMPT, pad], 1), torch.cat([ones, zeros], 1), slice(0, 8)
        position = PROMPT.shape[1] - 1
    padded_target, padded_inputs, padded_parameters = relevance(model, ids, mask, position)
    torch.testing.assert_close(padded_target, target)
    torch.testing.assert_close(padded_inputs[:, real], inputs, rtol=1e-4, atol=1e-6)
    assert padded_inputs[mask == 0].abs().max() == 0
    for name, value in parameters.items():
        torch.testing.assert_close(padded_parameters[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_gradient_checkpointing_in_train_mode_gives_the_same_relevance(model_type):
    """Checkpointed train mode (with dropout configured) equals eval mode without it."""
    model = make_tiny_model(model_type, attention_dropout=0.5, resid_pdrop=0.5)
    target, inputs, parameters = relevance(model, PROMPT)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = relevance(model, PROMPT)
    assert model.model.layers[0].gradient_checkpointing
    torch.testing.assert_close(checkpointed[0], target)
    torch.testing.assert_close(checkpointed[1], inputs)
    for name, value in parameters.items():
        torch.testing.assert_close(checkpointed[2][name], value, msg=name)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_bfloat16_relevance_follows_float32(model_type):
    """bfloat16 weights give finite relevance pointing where float32's does.

    Measured cosine similarity to float32: >= 0.9997 per parameter, 1.0000 for inputs.
    """
    model = make_tiny_model(model_type)
    _, inputs32, parameters32 = relevance(model, PROMPT)
    _, inputs16, parameters16 = relevance(model.to(torch.bfloat16), PROMPT)
    cosine = torch.nn.functional.cosine_similarity
    for name, value in [("inputs", inputs32), *parameters32.items()]:
        low = inputs16 if name == "inputs" else parameters16[name]
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all(), name
        assert cosine(low.float().flatten(), value.flatten(), dim=0) > 0.99, name

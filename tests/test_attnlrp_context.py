"""The rules context patches only its model, restores it on exit, and fails clearly if it cannot."""

import importlib.util

import pytest
import torch
import transformers
from helpers import PROMPT, relevance, untouched_state
from tiny_models import make_tiny_model

from mergekit_lrp.scoring.attnlrp import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
    attnlrp_rules,
)
from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

torch.set_num_threads(1)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_ordinary_forward_is_bit_identical_after_the_context(model_type):
    model = make_tiny_model(model_type)
    before_logits = model(PROMPT).logits
    before = untouched_state(model)
    relevance(model, PROMPT)
    assert untouched_state(model) == before
    assert torch.equal(model(PROMPT).logits, before_logits)


def test_second_model_is_unaffected_even_sharing_the_config():
    """A model built from the very same config object keeps its normal behaviour."""
    first = make_tiny_model("gemma2")
    second = type(first)(first.config).eval()
    ids = PROMPT.clone()
    expected_logits = second(ids).logits
    _, expected_inputs, expected = relevance(second, ids, rules=False)
    with attnlrp_rules(first):
        assert torch.equal(second(ids).logits, expected_logits)
        _, inputs, parameters = relevance(second, ids, rules=False)
    assert torch.equal(inputs, expected_inputs)
    assert all(torch.equal(parameters[n], expected[n]) for n in expected)


def test_restored_after_an_exception():
    model = make_tiny_model("gemma2")
    before_logits = model(PROMPT).logits
    before = untouched_state(model)
    with pytest.raises(KeyError):
        with attnlrp_rules(model):
            model(PROMPT).logits.sum().backward()
            raise KeyError("boom")
    assert untouched_state(model) == before
    assert torch.equal(model(PROMPT).logits, before_logits)


def test_accelerate_hooks_stay_active():
    """Under accelerate's dispatch hooks the rules still apply and the hooks still run."""
    hooks = pytest.importorskip("accelerate.hooks")

    called = set()

    class RecordingHook(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            called.add(module)
            return args, kwargs

    model = make_tiny_model("gemma2")
    expected = relevance(model, PROMPT)
    for module in model.modules():
        hooks.add_hook_to_module(module, RecordingHook())
    before = untouched_state(model)
    hooked = relevance(model, PROMPT)
    patched = ("Gemma2RMSNorm", "Gemma2MLP", "Linear")
    assert all(m in called for m in model.modules() if type(m).__name__ in patched)
    assert untouched_state(model) == before
    torch.testing.assert_close(hooked[1], expected[1])
    for name, value in expected[2].items():
        torch.testing.assert_close(hooked[2][name], value, msg=name)


def test_unsupported_architecture_is_named():
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'") as error:
        with attnlrp_rules(model):
            pass
    assert isinstance(error.value, ValueError)
    assert all(model_type in str(error.value) for model_type in SUPPORTED_MODEL_TYPES)


def test_missing_lxt_is_an_import_error(monkeypatch):
    model = make_tiny_model("llama")
    before = untouched_state(model)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lxt" else find_spec(name, *a)
    )
    load_lxt_rules.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps lxt==2\.1"):
            with attnlrp_rules(model):
                pass
    finally:
        load_lxt_rules.cache_clear()
    assert untouched_state(model) == before

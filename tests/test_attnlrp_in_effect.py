"""The AttnLRP rules are the forwards that actually run: on models loaded the way
``lrp-compute`` loads them (``from_pretrained``, which kernelizes them under newer
transformers), through train/eval switches and checkpointing, or the run stops."""

import contextlib

import pytest
import torch
import transformers
from checkpoints import PROMPTS
from helpers import PROMPT, invoke, relevance
from tiny_models import make_tiny_hybrid, make_tiny_model

from mergekit_lrp.scoring.attnlrp import (
    SUPPORTED_MODEL_TYPES,
    RulesNotInEffectError,
    attnlrp_rules,
    check_rules_in_effect,
)
from mergekit_lrp.scoring.relevance import backward_ready

torch.set_num_threads(1)


def _reloaded(model, path):
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("model_type", [*SUPPORTED_MODEL_TYPES, "qwen3_next_moe"])
def test_rules_run_on_a_loaded_model_in_train_mode(model_type, tmp_path):
    """Relevance of a ``from_pretrained`` model in backward_ready's checkpointed train
    mode equals that of the in-memory model in eval mode, and differs from plain
    gradient x input: every rule ran, none was dropped by a mode switch."""
    if model_type == "qwen3_next_moe":
        model = make_tiny_hybrid("qwen3_next")
    else:
        model = make_tiny_model(model_type)
    _, expected_inputs, expected = relevance(model, PROMPT)
    _, plain_inputs, _ = relevance(model, PROMPT, rules=False)
    assert not torch.allclose(expected_inputs, plain_inputs, rtol=1e-3, atol=1e-6)

    loaded = _reloaded(model, tmp_path / "m")
    loaded.zero_grad(set_to_none=True)
    with attnlrp_rules(loaded), backward_ready(loaded, checkpointing=True):
        check_rules_in_effect(loaded, passes=False)
        embeddings = loaded.get_input_embeddings()(PROMPT)
        embeddings.retain_grad()
        logits = loaded(inputs_embeds=embeddings).logits
        logits[0, -1].max().backward()
        check_rules_in_effect(loaded)
    torch.testing.assert_close(embeddings * embeddings.grad, expected_inputs)
    scored = {n: p * p.grad for n, p in loaded.named_parameters() if p.grad is not None}
    assert scored.keys() == expected.keys()
    for name, value in scored.items():
        torch.testing.assert_close(value, expected[name], msg=name)


def test_hub_kernels_are_off_inside_and_back_on_after(tmp_path):
    """Where transformers kernelizes loaded models, the context keeps train()/eval() from
    re-kernelizing it (which drops the rules) and restores kernelization at exit."""
    loaded = _reloaded(make_tiny_model("llama"), tmp_path / "m")
    if not getattr(loaded, "use_kernels", False):
        pytest.skip(f"transformers {transformers.__version__} does not kernelize this model")
    with attnlrp_rules(loaded):
        assert not loaded.use_kernels
        loaded.train()
        loaded.eval()
        check_rules_in_effect(loaded, passes=False)
    assert loaded.use_kernels
    assert not any("forward" in m.__dict__ for m in loaded.modules())


def test_a_replaced_rule_is_named(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(RulesNotInEffectError) as error:
        with attnlrp_rules(model):
            model.model.norm.__dict__.pop("forward")  # as a re-kernelization does
            model(PROMPT)
    message = str(error.value)
    assert "LlamaRMSNorm" in message and transformers.__version__ in message
    assert "\n" not in message
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored anyway


def test_a_bypassed_rule_is_named(monkeypatch):
    """A class-level wrapper that calls the class's forward (not the instance's) skips the
    rule although the instance attribute is intact: the call count sees it."""
    model = make_tiny_model("qwen3")
    mlp_class = type(model.model.layers[0].mlp)
    with attnlrp_rules(model):
        monkeypatch.setattr(mlp_class, "__call__", lambda self, x: mlp_class.forward(self, x))
        model(PROMPT).logits[0, -1].max().backward()
        with pytest.raises(RulesNotInEffectError, match="Qwen3MLP .*never ran"):
            check_rules_in_effect(model)
        monkeypatch.undo()
        model(PROMPT)  # the rule runs again, so the exit check passes


def test_lrp_compute_writes_nothing_from_a_pass_without_rules(llama_dir, tmp_path, monkeypatch):
    """lrp-compute stops with one line naming the module class and transformers'
    version, and leaves no score file, when a forward is replaced during the pass."""
    from mergekit_lrp.scoring import loop

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ready = loop.backward_ready

    @contextlib.contextmanager
    def dropping_rules(net, *args, **kwargs):  # as train() re-kernelizing the model does
        with ready(net, *args, **kwargs):
            for module in net.modules():
                if type(module).__name__ == "LlamaRMSNorm":
                    module.__dict__.pop("forward", None)
            yield

    monkeypatch.setattr(loop, "backward_ready", dropping_rules)
    out = tmp_path / "s.safetensors"
    result = invoke(llama_dir, "--prompts", prompts, "-o", out, "-q")
    assert result.exit_code != 0
    assert "LlamaRMSNorm" in result.output and transformers.__version__ in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob("s.safetensors*"))

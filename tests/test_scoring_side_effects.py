"""Scoring leaves the model as it was; gradient checkpointing changes memory, not scores."""


import pytest
import torch
from checkpoints import PROMPTS, char_tokenizer
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.relevance import backward_ready


def test_model_behaves_as_before_after_scoring():
    model = make_tiny_model("llama", seed=4, **AS_CHECKPOINT)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    ids = torch.tensor([[5, 9, 14, 22, 30]])
    before = model(ids).logits
    scores = relevance_scores(model, char_tokenizer(), PROMPTS)
    after = model(ids).logits
    assert torch.equal(before, after)
    assert not model.training and not model.is_activation_checkpointing
    assert model.config.use_cache is True
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.isfinite(s).all() and s.sum() > 0 for s in scores.values())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_checkpointing_is_on_only_when_asked_and_restored(checkpointing):
    model = make_tiny_model("llama", seed=6, **AS_CHECKPOINT)
    with backward_ready(model, checkpointing):
        assert model.is_activation_checkpointing is checkpointing
        assert model.model.layers[0].gradient_checkpointing is checkpointing
    assert not model.is_activation_checkpointing
    assert not model.model.layers[0].gradient_checkpointing


def test_checkpointing_changes_memory_not_scores():
    model = make_tiny_model("llama", seed=6, **AS_CHECKPOINT)
    with_ckpt = relevance_scores(model, char_tokenizer(), PROMPTS)
    without = relevance_scores(model, char_tokenizer(), PROMPTS,
                               ComputeOptions(gradient_checkpointing=False, progress=False))
    for name in with_ckpt:
        torch.testing.assert_close(with_ckpt[name], without[name], rtol=1e-5, atol=1e-8)

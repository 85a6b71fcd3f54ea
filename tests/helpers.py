"""Helpers the test modules share: a prompt, relevance by the rules, conservation, a Ctrl-C
mid-run, the CLI, lrp configs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from click.testing import CliRunner, Result
from torch import enable_grad, tensor

# eight token ids within every tiny model's vocabulary
PROMPT = tensor([[5, 17, 42, 8, 77, 23, 61, 30]])


def relevance(model, ids, attention_mask=None, position=-1, rules=True):
    """Target logit (top class at ``position``), input and parameter relevance.

    With ``rules=False``: plain gradient x input, for comparison.
    """
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    model.zero_grad(set_to_none=True)
    embeddings = model.get_input_embeddings()(ids)
    embeddings.retain_grad()
    with attnlrp_rules(model) if rules else enable_grad():
        logits = model(inputs_embeds=embeddings, attention_mask=attention_mask).logits
        target = logits[0, position].max()
        target.backward()
    parameters = {
        name: (p * p.grad).detach() for name, p in model.named_parameters() if p.grad is not None
    }
    return target.detach(), (embeddings * embeddings.grad).detach(), parameters


def assert_input_relevance_conserves(model, cycle, low: float, high: float) -> None:
    """On 7 windows of 12 tokens of ``cycle``: the input relevance under the rules sums to
    between ``low`` and ``high`` times the target, while plain gradient x input (same
    target) is far from it, which proves the rules are active."""
    for start in range(7):
        ids = cycle[start : start + 12][None]
        target, inputs, _ = relevance(model, ids)
        ratio = inputs.sum() / target
        assert low <= ratio <= high, (start, ratio.item())
        plain_target, plain_inputs, _ = relevance(model, ids, rules=False)
        torch.testing.assert_close(plain_target, target)
        assert abs(plain_inputs.sum() / plain_target - 1) > 0.9


@contextlib.contextmanager
def interrupted_at_pass(n: int):
    """lrp-compute's ``n``-th relevance pass raises KeyboardInterrupt (a Ctrl-C mid-run);
    the block must end with it; the loop is restored afterwards."""
    from mergekit_lrp.scoring import loop

    real, calls = loop.relevance_pass, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    loop.relevance_pass = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        loop.relevance_pass = real


def untouched_state(model):
    """What the context must restore: per-module forwards and config objects."""
    return [
        (name, *(module.__dict__.get(key) for key in ("forward", "_old_forward", "config")))
        for name, module in model.named_modules()
    ], (model.config._attn_implementation, getattr(model.config, "final_logit_softcapping", None))


def invoke(*args) -> Result:
    """Run the ``lrp-compute`` command in-process with ``args`` (paths allowed)."""
    from mergekit_lrp.scoring.cli import main as cli

    return CliRunner().invoke(cli, [str(a) for a in args])


#: lrp's per-tensor top-k with the kept deltas added (the rule before the defaults were
#: chosen on the benchmark): what hand computations of masks and sums check
TOPK_RULE = {"selection": "topk", "consensus": "none", "normalize": False}
#: stochastic selection with conflicts to the first-listed model (lrp's former defaults)
STOCHASTIC_RULE = {"selection": "stochastic", "consensus": "priority", "normalize": True}


def lrp_config(family, **parameters) -> dict:
    """A mergekit config dict for an lrp merge of the family's two fine-tunes, with the
    :data:`TOPK_RULE` unless ``rule`` says otherwise (``rule={}``: lrp's defaults).

    ``family`` is the ``family`` fixture; ``per_model`` maps ``ft_a`` / ``ft_b`` to
    parameters that replace or add to theirs, every other keyword is a global parameter.
    """
    per_model = parameters.pop("per_model", {})
    parameters = {**parameters.pop("rule", TOPK_RULE), **parameters}
    models = []
    for name in ("ft_a", "ft_b"):
        params = {"weight": 1.0, "lrp_scores": str(family[f"{name}_scores"])}
        params.update(per_model.get(name, {}))
        models.append({"model": str(family[name]), "parameters": params})
    return {
        "merge_method": "lrp",
        "base_model": str(family["base"]),
        "parameters": {"density": 0.5, **parameters},
        "models": models,
        "dtype": "float32",
    }

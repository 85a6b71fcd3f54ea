"""The prompt loop: one relevance pass per prompt, gradients summed as they complete."""

from __future__ import annotations

import contextlib
import sys

import torch

from mergekit_lrp.scoring.accumulator import GradientAccumulator
from mergekit_lrp.scoring.activation import ActivationAccumulator
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.prompts import Prompt
from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
from mergekit_lrp.scoring.resume import LoopState
from mergekit_lrp.scoring.signals import SIGNALS, Signal


def input_device(net) -> torch.device:
    """Where input ids must go: the device of the input embeddings (under a device map
    the first and last layers may sit on different GPUs)."""
    return net.get_input_embeddings().weight.device


def run_prompts(net, prompts, options, accumulator, state, save_state=None):
    r"""Score ``prompts[state.done:]`` (tokenized :class:`Prompt`\ s) into ``accumulator``
    under the AttnLRP rules.

    The model is patched and prepared for backward only for the duration; calls
    ``save_state(state)`` every ``options.checkpoint_every`` prompts.
    """
    from tqdm import tqdm

    signal = SIGNALS[options.method]
    device = input_device(net)
    bar = tqdm(
        total=len(prompts),
        initial=state.done,
        unit="prompt",
        desc="relevance",
        disable=not options.progress,
        file=sys.stderr,
    )
    with _pass_context(net, signal, options):
        accumulator.attach()
        try:
            for index in range(state.done, len(prompts)):
                prompt = prompts[index]
                ids = torch.tensor(prompt.ids, dtype=torch.long)
                answer_start = prompt.answer_start
                if ids.numel() > options.max_length:
                    cut = ids.numel() - options.max_length
                    ids = ids[cut:]
                    if answer_start is not None:
                        answer_start = max(answer_start - cut, 1)
                    state.truncated += 1
                mask = torch.ones_like(ids)
                if signal.backward:
                    target = signal.seed or options.target
                    state.last = relevance_pass(
                        net, ids.to(device), mask.to(device), target, answer_start
                    )
                else:
                    net(input_ids=ids.to(device).unsqueeze(0), use_cache=False, logits_to_keep=1)
                    state.last = None
                state.tokens += ids.numel()
                state.done = index + 1
                bar.update(1)
                if save_state and state.done % options.checkpoint_every == 0:
                    if state.done < len(prompts):
                        save_state(state)
        finally:
            accumulator.detach()
            bar.close()
    return state


@contextlib.contextmanager
def _pass_context(net, signal: Signal, options: ComputeOptions):
    """The rules (AttnLRP only) and backward preparation, or no-grad for forward-only."""
    if not signal.backward:
        with torch.no_grad():
            yield
        return
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    rules = attnlrp_rules(net) if signal.rules else contextlib.nullcontext()
    with rules, backward_ready(net, options.gradient_checkpointing is True):
        yield


def relevance_scores(net, tokenizer, prompts, options=None) -> dict[str, torch.Tensor]:
    """In-memory scores (parameter name -> mean |grad|) of an already loaded model on
    plain-text ``prompts``."""
    options = options or ComputeOptions(progress=False)
    accumulator = new_accumulator(net, dict(net.named_parameters()), options.method)
    tokenized = [Prompt(tuple(tokenizer(text)["input_ids"])) for text in prompts]
    run_prompts(net, tokenized, options, accumulator, LoopState())
    return accumulator.scores(len(prompts))


def new_accumulator(net, parameters: dict, method: str, on_device: bool = False):
    """The accumulator ``method`` sums into, over ``parameters`` (score name -> parameter);
    gradient sums on each parameter's device when ``on_device``."""
    signal = SIGNALS[method]
    if not signal.backward:
        return ActivationAccumulator(net, parameters)
    return GradientAccumulator(parameters, square=signal.square, on_device=on_device)

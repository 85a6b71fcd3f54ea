"""The prompt loop: one pass of the chosen signal per prompt, summed into an accumulator.

A backward signal (attnlrp, gradient, fisher; gram weighted by relevance or gradient) runs
one forward and one backward pass per prompt (:func:`.relevance.relevance_pass`), under
the AttnLRP rules for ``attnlrp`` (and gram's ``relevance``); a forward-only signal
(activation; gram unweighted or weighted by the answer) runs the forward pass alone. The
accumulator's hooks collect what the signal sums while the pass runs.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace

import torch

from mergekit_lrp.scoring.accumulator import Accumulator, new_accumulator
from mergekit_lrp.scoring.options import ComputeOptions, decide_max_length
from mergekit_lrp.scoring.placement import plan
from mergekit_lrp.scoring.prompts import Prompt
from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
from mergekit_lrp.scoring.resume import LoopState


def input_device(net) -> torch.device:
    """Where input ids must go: the device of the input embeddings (under a device map
    the first and last layers may sit on different GPUs)."""
    return net.get_input_embeddings().weight.device


def run_prompts(
    net,
    prompts: list[Prompt],
    options: ComputeOptions,
    accumulator: Accumulator,
    state: LoopState,
    save_state=None,
) -> LoopState:
    """Run ``options.signal``'s pass on ``prompts[state.done:]`` into ``accumulator``.

    ``gradient_checkpointing="auto"`` is decided by :func:`.placement.plan` and an unset
    ``max_length`` by :func:`.options.decide_max_length`, as for ``lrp-compute``. The
    model is patched and prepared for backward only for the duration;
    ``save_state(state)`` is called every ``options.checkpoint_every`` prompts.
    """
    from tqdm import tqdm

    if options.max_length is None:
        options = decide_max_length(options, net.config)
    if options.gradient_checkpointing == "auto":
        parameters = dict(net.named_parameters())
        dtype = next(iter(parameters.values())).dtype
        checkpointing = plan(options, net, parameters, dtype).checkpointing
        options = replace(options, gradient_checkpointing=checkpointing)
    signal = options.signal
    device = input_device(net)
    bar = tqdm(
        total=len(prompts),
        initial=state.done,
        unit="prompt",
        desc=signal.pass_name,
        disable=not options.progress,
        file=sys.stderr,
    )
    with _pass_context(net, options) as check_pass:
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
                accumulator.start_prompt(ids.numel(), answer_start)
                if signal.backward:
                    target = signal.target(options.target)
                    state.last = relevance_pass(
                        net, ids.to(device), mask.to(device), target, answer_start
                    )
                    check_pass()
                else:  # the output head's Gram matrix is over every position
                    keep = 0 if signal.token_weighting else 1
                    net(input_ids=ids.to(device).unsqueeze(0), use_cache=False, logits_to_keep=keep)
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
def _pass_context(net, options: ComputeOptions):
    """The rules (AttnLRP only) and backward preparation, or no-grad for forward-only.

    Yields the check to run after each pass: under the rules it raises
    :class:`.attnlrp.RulesNotInEffectError` before a pass without them is accumulated
    into anything that gets written (and once before the first prompt).
    """
    signal = options.signal
    if not signal.backward:
        with torch.no_grad():
            yield lambda: None
        return
    ready = backward_ready(
        net, options.gradient_checkpointing, parameter_grads=signal.parameter_grads
    )
    if not signal.rules:
        with ready:
            yield lambda: None
        return
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules, check_rules_in_effect

    with attnlrp_rules(net), ready:
        check_rules_in_effect(net, passes=False)
        yield lambda: check_rules_in_effect(net)


def relevance_scores(
    net, tokenizer, prompts: list[str], options: ComputeOptions | None = None
) -> dict[str, torch.Tensor]:
    """In-memory scores (parameter name -> ``options.signal``'s mean over ``prompts``) of
    an already loaded model on plain-text ``prompts``; ``auto`` options are decided as
    ``lrp-compute`` decides them (:func:`.placement.plan`)."""
    options = decide_max_length(options or ComputeOptions(progress=False), net.config)
    parameters = dict(net.named_parameters())
    dtype = next(iter(parameters.values())).dtype
    placement = plan(options, net, parameters, dtype)
    options = replace(options, gradient_checkpointing=placement.checkpointing)
    tokenized = [Prompt(tuple(tokenizer(text)["input_ids"])) for text in prompts]
    probe = torch.tensor(tokenized[0].ids[-options.max_length :])
    accumulator = new_accumulator(
        net, parameters, options.signal, placement.sums_on_device, probe=probe
    )
    run_prompts(net, tokenized, options, accumulator, LoopState())
    return accumulator.scores(len(prompts))

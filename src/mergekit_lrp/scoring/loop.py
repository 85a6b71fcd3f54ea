"""The prompt loop: one relevance pass per prompt, gradients summed as they complete."""

from __future__ import annotations

import sys

import torch

from mergekit_lrp.scoring.accumulator import GradientAccumulator
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
from mergekit_lrp.scoring.resume import LoopState


def input_device(net) -> torch.device:
    """Where input ids must go: the device of the input embeddings (under a device map
    the first and last layers may sit on different GPUs)."""
    return net.get_input_embeddings().weight.device


def run_prompts(net, tokenizer, prompts, options, accumulator, state, save_state=None):
    """Score ``prompts[state.done:]`` into ``accumulator`` under the AttnLRP rules.

    The model is patched and prepared for backward only for the duration; calls
    ``save_state(state)`` every ``options.checkpoint_every`` prompts.
    """
    from tqdm import tqdm

    from mergekit_lrp.scoring.attnlrp import attnlrp_rules

    device = input_device(net)
    bar = tqdm(
        total=len(prompts),
        initial=state.done,
        unit="prompt",
        desc="relevance",
        disable=not options.progress,
        file=sys.stderr,
    )
    with attnlrp_rules(net), backward_ready(net, options.gradient_checkpointing):
        accumulator.attach()
        try:
            for index in range(state.done, len(prompts)):
                ids = tokenizer(prompts[index], return_tensors="pt")["input_ids"][0]
                if ids.numel() > options.max_length:
                    ids = ids[-options.max_length :]
                    state.truncated += 1
                mask = torch.ones_like(ids)
                state.last = relevance_pass(net, ids.to(device), mask.to(device), options.target)
                state.tokens += state.last.tokens
                state.done = index + 1
                bar.update(1)
                if save_state and state.done % options.checkpoint_every == 0:
                    if state.done < len(prompts):
                        save_state(state)
        finally:
            accumulator.detach()
            bar.close()
    return state


def relevance_scores(net, tokenizer, prompts, options=None) -> dict[str, torch.Tensor]:
    """In-memory scores (parameter name -> mean |grad|) for an already loaded model."""
    options = options or ComputeOptions(progress=False)
    accumulator = GradientAccumulator(dict(net.named_parameters()))
    run_prompts(net, tokenizer, prompts, options, accumulator, LoopState())
    return {name: total / len(prompts) for name, total in accumulator.sums.items()}

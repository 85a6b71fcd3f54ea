"""What every accumulator of ``lrp-compute`` does, and which one a signal sums into.

An accumulator hooks into the model while the prompt loop runs (:meth:`attach` /
:meth:`detach`), keeps float32 running sums (:meth:`totals`, what resume files store and
processes all-reduce), and turns them into the scores written to the file
(:meth:`scores`). :mod:`.gradient_sums` sums gradients (attnlrp, gradient, fisher),
:mod:`.activation` sums squared inputs (activation), :mod:`.gram_statistics` the token-weighted Gram
matrices of linear layers' inputs (gram).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mergekit_lrp.scoring.signals import Signal


class Accumulator(Protocol):
    #: score names that received something in this process
    seen: set[str]

    def attach(self) -> None: ...

    def detach(self) -> None: ...

    def start_prompt(self, tokens: int, answer_start: int | None) -> None:
        """Called before each prompt's pass: its token count (after truncation) and where
        a chat's answer starts (None: no answer)."""
        ...

    def totals(self) -> dict[str, torch.Tensor]:
        """The running float32 sums, by name, complete (updated in place when resumed)."""
        ...

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """The scores of ``count`` prompts, shaped as the checkpoint's tensors."""
        ...


def new_accumulator(
    net,
    parameters: dict[str, torch.nn.Parameter],
    signal: Signal,
    on_device: bool = False,
    probe: torch.Tensor | None = None,
) -> Accumulator:
    """The accumulator ``signal`` sums into, over ``parameters`` (score name ->
    parameter); sums on each parameter's device when ``on_device``. ``probe`` (token ids,
    the first prompt's): the forward pass in which the Gram signals find which linear
    layers read the same input."""
    if signal.is_gram:
        from mergekit_lrp.scoring.gram_statistics import GramAccumulator

        return GramAccumulator(net, parameters, signal.token_weighting, on_device, probe)
    if not signal.backward:
        from mergekit_lrp.scoring.activation import ActivationAccumulator

        return ActivationAccumulator(net, parameters)
    from mergekit_lrp.scoring.gradient_sums import GradientAccumulator

    return GradientAccumulator(parameters, square=signal.square, on_device=on_device)

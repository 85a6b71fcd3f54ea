"""What every accumulator of ``lrp-compute`` does, and which one a signal sums into.

An accumulator hooks into the model while the prompt loop runs (:meth:`attach` /
:meth:`detach`), keeps float32 running sums (:meth:`totals`, what resume files store and
processes all-reduce), and turns them into the scores written to the file
(:meth:`scores`). :mod:`.gradient_sums` sums gradients (attnlrp, gradient, fisher),
:mod:`.activation` sums squared inputs (activation).
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

    def totals(self) -> dict[str, torch.Tensor]:
        """The running float32 sums, by name, complete (updated in place when resumed)."""
        ...

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """The scores of ``count`` prompts, shaped as the checkpoint's tensors."""
        ...


def new_accumulator(
    net, parameters: dict[str, torch.nn.Parameter], signal: Signal, on_device: bool = False
) -> Accumulator:
    """The accumulator ``signal`` sums into, over ``parameters`` (score name ->
    parameter); gradient sums on each parameter's device when ``on_device``."""
    if not signal.backward:
        from mergekit_lrp.scoring.activation import ActivationAccumulator

        return ActivationAccumulator(net, parameters)
    from mergekit_lrp.scoring.gradient_sums import GradientAccumulator

    return GradientAccumulator(parameters, square=signal.square, on_device=on_device)

"""Sum |grad| (or grad²) per parameter as soon as each gradient is complete: the
accumulator of the backward signals (attnlrp, gradient, fisher).

A post-accumulate-grad hook adds every finished gradient into a float32 sum, on the
parameter's own device or on the host (:mod:`.placement` decides), and frees it, so peak
memory is weights + sums + activations rather than weights + all gradients + sums. Host
sums of device parameters are added in the background (:mod:`.host_adder`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergekit_lrp.scoring.host_adder import HostAdder, add_magnitude


class GradientAccumulator:
    """Running sums of |d target / d p| (or of its square, ``square=True``) for a model's
    (deduplicated) parameters.

    ``overlap``: add host sums in a background thread (default: when the sums are on the
    host and some parameter is not); ``True`` forces it, which tests use on the CPU.
    """

    def __init__(
        self,
        parameters: Mapping[str, torch.nn.Parameter],
        square: bool = False,
        on_device: bool = False,
        overlap: bool | None = None,
    ):
        self.parameters = dict(parameters)
        self.square = square
        self.sums = {
            name: torch.zeros(p.shape, dtype=torch.float32, device=p.device if on_device else "cpu")
            for name, p in self.parameters.items()
        }
        off_host = any(p.device.type != "cpu" for p in self.parameters.values())
        self.overlap = not on_device and (off_host if overlap is None else overlap)
        self._pin = off_host and torch.cuda.is_available()
        #: parameters that received a gradient in this process (MoE routers never do:
        #: AttnLRP treats them as constants)
        self.seen: set[str] = set()
        self._handles = []
        self._adder: HostAdder | None = None

    def attach(self) -> None:
        if self.overlap and self.parameters:
            largest = max(p.numel() * p.element_size() for p in self.parameters.values())
            self._adder = HostAdder(largest, pin=self._pin)
        for name, parameter in self.parameters.items():
            self._handles.append(parameter.register_post_accumulate_grad_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for parameter in self.parameters.values():
            parameter.grad = None
        if self._adder is not None:
            adder, self._adder = self._adder, None
            adder.close()

    def start_prompt(self, tokens: int, answer_start: int | None) -> None:
        pass

    def _hook(self, name: str):
        total, square = self.sums[name], self.square

        def consume(parameter: torch.Tensor) -> None:
            if self._adder is not None:
                self._adder.submit(total, parameter.grad.detach(), square)
            else:
                add_magnitude(total, parameter.grad.detach(), square)
            parameter.grad = None
            self.seen.add(name)

        return consume

    def totals(self) -> dict[str, torch.Tensor]:
        """The running sums themselves (every background addition finished)."""
        if self._adder is not None:
            self._adder.drain()
        return self.sums

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """The mean over ``count`` prompts of each parameter's sum."""
        return {name: total / count for name, total in self.totals().items()}

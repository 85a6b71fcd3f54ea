"""Sum |grad| per parameter as soon as each gradient is complete.

A post-accumulate-grad hook adds every finished gradient into a float32 sum, on the
parameter's own device or on the host (:mod:`.placement` decides), and frees it, so peak
memory is weights + sums + activations rather than weights + all gradients + sums. Host
sums of device parameters are added in the background (:mod:`.host_adder`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.file import atomic_save
from mergekit_lrp.scoring.host_adder import HostAdder, add_magnitude

RESUME_FORMAT = "mergekit-lrp-resume"


class ResumeError(LrpError):
    """A resume checkpoint is unreadable or was made with other inputs."""


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

    def _drain(self) -> None:
        if self._adder is not None:
            self._adder.drain()

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """The mean over ``count`` prompts of each parameter's sum."""
        self._drain()
        return {name: total / count for name, total in self.sums.items()}

    def save(self, path: Path, state: Mapping[str, object]) -> None:
        self._drain()
        save_sums(path, self.sums, state)

    def load(self, path: Path) -> dict:
        return load_sums(path, self.sums)


def save_sums(path: Path, sums: Mapping[str, torch.Tensor], state: Mapping[str, object]) -> None:
    """Checkpoint ``sums`` and the loop ``state`` (JSON) for ``--resume``."""
    header = {"format": RESUME_FORMAT, "state": json.dumps(dict(state), sort_keys=True)}
    atomic_save(path, {name: total.cpu() for name, total in sums.items()}, header)


def load_sums(path: Path, sums: Mapping[str, torch.Tensor]) -> dict:
    """Restore ``sums`` in place from a checkpoint; return its loop state."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != RESUME_FORMAT:
                raise ResumeError(f"{path}: not an lrp-compute resume checkpoint")
            if set(handle.keys()) != set(sums):
                raise ResumeError(
                    f"{path}: checkpoint tensors do not match this model's parameters"
                )
            for name, total in sums.items():
                saved = handle.get_tensor(name)
                if saved.shape != total.shape or saved.dtype != torch.float32:
                    raise ResumeError(f"{path}: checkpoint tensor {name!r} does not match")
                total.copy_(saved)
            return json.loads(header["state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise ResumeError(f"{path}: unreadable resume checkpoint ({error})") from None

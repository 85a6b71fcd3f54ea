"""Adding device gradients into host float32 sums without making the device wait.

When the sums live on the host (``--accumulate-on cpu``, or ``auto`` when the devices are
short of memory), each finished gradient is copied into a pinned staging buffer with a
non-blocking copy ordered on its stream; one worker thread waits for that copy, converts
and adds it into the parameter's float32 sum, and returns the buffer to the pool. The
backward pass goes on computing the next gradients (and the next prompt) meanwhile. The
pool is bounded, so when the host falls behind, a hook waits for a free buffer instead of
holding more gradients in device memory. Additions into each sum happen in the order the
gradients were submitted, so the sums are bit-identical to adding them synchronously.
"""

from __future__ import annotations

import queue
import threading

import torch

#: staging buffers, each the size of the largest gradient: one being filled by the copy
#: engine, one being added by the worker, one spare so neither waits for the other
SLOTS = 3


def add_magnitude(total: torch.Tensor, grad: torch.Tensor, square: bool) -> None:
    """total += |grad| (or grad²), computed in float32 on ``total``'s device."""
    grad = grad.to(total.device, torch.float32)
    total.add_(grad.square_() if square else grad.abs_())


class HostAdder:
    """``submit(total, grad, square)`` adds |grad| (or grad², in float32) into the host
    tensor ``total`` in the background; ``drain()`` waits until every submitted addition
    is done (call it before reading the sums)."""

    def __init__(self, largest_bytes: int, pin: bool, slots: int = SLOTS):
        self._capacity = largest_bytes
        self._free: queue.Queue = queue.Queue()
        for _ in range(slots):
            self._free.put(torch.empty(largest_bytes, dtype=torch.uint8, pin_memory=pin))
        self._work: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._worker = threading.Thread(target=self._run, name="lrp-host-sums", daemon=True)
        self._worker.start()

    def submit(self, total: torch.Tensor, grad: torch.Tensor, square: bool) -> None:
        self._raise_if_failed()
        size = grad.numel() * grad.element_size()
        if size > self._capacity:  # a gradient wider than its parameter: add it here
            self.drain()
            add_magnitude(total, grad, square)
            return
        buffer = self._free.get()
        staged = buffer[:size].view(grad.dtype).view(grad.shape)
        staged.copy_(grad, non_blocking=True)
        done = None
        if grad.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(grad.device))
        self._work.put((total, staged, buffer, done, square))

    def drain(self) -> None:
        self._work.join()
        self._raise_if_failed()

    def close(self) -> None:
        self.drain()
        self._work.put(None)
        self._worker.join()

    def _run(self) -> None:
        while (item := self._work.get()) is not None:
            total, staged, buffer, done, square = item
            try:
                if self._error is None:
                    self._add(total, staged, done, square)
            except BaseException as error:  # raised in the scoring thread by the next call
                self._error = error
            finally:
                self._free.put(buffer)
                self._work.task_done()
        self._work.task_done()

    @staticmethod
    def _add(total, staged, done, square) -> None:
        if done is not None:
            done.synchronize()
        add_magnitude(total, staged, square)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"adding a gradient into the host sums failed: {self._error}")

"""Spread ``lrp-compute``'s prompts over processes started by torchrun or accelerate launch.

Both launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in every process. Each
process scores every ``world_size``-th prompt; the float32 accumulators and the token
counts are then summed with ``all_reduce`` (gloo on CPUs, nccl on GPUs) and the first
process writes the file. Without those variables everything runs in this one process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes sharing one ``lrp-compute`` run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items: every ``world_size``-th, starting at ``rank``."""
        return items[self.rank :: self.world_size]

    def sum_tensors(self, tensors: MutableMapping[str, torch.Tensor], device) -> None:
        """Sum each tensor over all processes, in place and one tensor at a time.

        Sums on a GPU are reduced there (nccl); host sums visit ``device`` one tensor at
        a time under nccl (peak extra memory there is one tensor), or stay on the host
        under gloo.
        """
        if self.backend is None:
            return
        import torch.distributed as dist

        for name in sorted(tensors):  # same order in every process
            total = tensors[name]
            if self.backend == "nccl" and total.device.type == "cuda":
                dist.all_reduce(total)  # sums kept on the device: reduced where they are
            elif self.backend == "nccl":
                buffer = total.to(device)
                dist.all_reduce(buffer)
                total.copy_(buffer.cpu())
            else:
                dist.all_reduce(total)

    def sum_counts(self, counts: list[int], device) -> list[int]:
        if self.backend is None:
            return counts
        import torch.distributed as dist

        buffer = torch.tensor(counts, dtype=torch.int64, device=self.tensor_device(device))
        dist.all_reduce(buffer)
        return [int(value) for value in buffer.cpu()]

    def max_count(self, value: int, device) -> int:
        if self.backend is None:
            return value
        import torch.distributed as dist

        buffer = torch.tensor([value], dtype=torch.int64, device=self.tensor_device(device))
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
        return int(buffer.item())

    def barrier(self) -> None:
        if self.backend is not None:
            import torch.distributed as dist

            dist.barrier()

    def tensor_device(self, device) -> torch.device:
        """Where tensors travel between processes: ``device`` under nccl, else the host."""
        return torch.device(device) if self.backend == "nccl" else torch.device("cpu")


def launched_world_size() -> int:
    """The number of processes a launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def joined_workers(use_cuda: bool) -> Iterator[Workers]:
    """Join the launcher's process group for the block (and leave it afterwards).

    A group that already exists (e.g. created by accelerate) is used and left open.
    """
    if launched_world_size() == 1:
        yield Workers()
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield Workers(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=dist.get_backend(),
        )
    finally:
        if created:
            dist.destroy_process_group()

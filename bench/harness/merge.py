"""One merge through mergekit's own ``run_merge``, as both benchmarks run it.

Importing this module imports mergekit (seconds): the cost workers import it lazily, so
the processes that measure no merge do not carry it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge as mergekit_run_merge
from mergekit.options import MergeOptions
from peers import register

register()  # the published peers' rows (TSV-M, Iso-C, WUDI) merge by name


def configuration(config: dict) -> MergeConfiguration:
    """``config`` (a mergekit configuration as a dict) validated by mergekit."""
    return MergeConfiguration.model_validate(config)


def run_merge(config: MergeConfiguration, out, seed, lora_cache=None) -> None:
    """Merge into ``out``; ``seed`` seeds the random methods; ``lora_cache``: mergekit's
    ``--lora-merge-cache`` (for ``base+adapter`` models). No tokenizer or model card is
    written."""
    options = MergeOptions(
        quiet=True,
        random_seed=seed,
        copy_tokenizer=False,
        write_model_card=False,
        lora_merge_cache=str(lora_cache) if lora_cache else None,
    )
    mergekit_run_merge(config, str(out), options)


def exact_ranks(on: bool):
    """While ``on``, lrp's stochastic selection ranks every tensor exactly (a sort), as it
    does below its size threshold: the reference its approximate ranks are measured
    against (docs/method.md states their bound)."""
    from mergekit_lrp.merging.selection import exact_ranks as exact

    return exact(on)


#: sparsifications that depend on the tensor and their settings alone (no random draw)
_DETERMINISTIC = ("magnitude", "magnitude_outliers")


@contextmanager
def sparsification_reused():
    """While open, mergekit's deterministic sparsifications (TIES' magnitude top-k,
    Breadcrumbs' outlier cut) of a tensor at the same settings are computed once.

    One table cell merges the same task vectors at several weights, and the weight is
    applied after sparsifying, so each merge repeats the same full sort of every task
    vector: most of a TIES merge's time on a CPU. The first result's mask is kept (keyed
    by a digest of the tensor's bytes and the settings) and later calls multiply by it,
    the very product mergekit computes, so every merge is bit-identical to one run
    without reuse (tests/test_bench_harness.py checks it)."""
    import mergekit.merge_methods.generalized_task_arithmetic as gta

    original, masks = gta.sparsify, {}

    def sparsify(tensor, density, method, rescale_norm=None, **settings):
        if str(getattr(method, "value", method)) not in _DETERMINISTIC or rescale_norm:
            return original(tensor, density, method, rescale_norm=rescale_norm, **settings)
        key = (_digest(tensor), density, str(method), tuple(sorted(settings.items())))
        if key not in masks:
            kept = original(tensor, density, method, **settings)
            masks[key] = kept != 0  # where the product is 0 anyway, either mask gives it
            return kept
        return tensor * masks[key].to(tensor.dtype)

    gta.sparsify = sparsify
    try:
        yield
    finally:
        gta.sparsify = original


def _digest(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return (tuple(tensor.shape), str(tensor.dtype), hashlib.sha1(data).digest())


def scratch_dir(prefix: str) -> Path:
    """A new scratch directory for merged checkpoints: in shared memory when it has room
    for a few of them (writing and reading back each merge is then no disk traffic),
    else the system's temporary directory."""
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30
    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm if roomy else None))

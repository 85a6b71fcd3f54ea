"""One merge through mergekit's own ``run_merge``, as both benchmarks run it.

Importing this module imports mergekit (seconds): the cost workers import it lazily, so
the processes that measure no merge do not carry it.
"""

from __future__ import annotations

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

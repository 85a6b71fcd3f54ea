"""Wrap ``mergekit.merge.run_merge`` so merges with this project's methods (``lrp``,
``circuit``, ``regmean``: :data:`.merging.methods.METHODS`) are checked first, seeded,
staged, and recorded.

Other merge methods go straight to mergekit's own ``run_merge``, untouched. For ours:

1. every check that can fail before the merge runs (:func:`.preflight.check_merge`);
2. a seed is drawn when none was given, so the output can be reproduced;
3. mergekit merges into a hidden staging folder, without its model card (the objects
   alive before it frozen out of the garbage collector's full scans);
4. the card and the saved config (every resolved parameter, versions, seed, score files)
   are written from what is known locally: no step after the weights can lose them;
5. the staging folder takes the output folder's place (:mod:`.merging.staging`);
6. what the kernels cached for this merge is dropped (:mod:`.merging.caches`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
from pathlib import Path
from types import ModuleType

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.methods import METHODS


@contextlib.contextmanager
def one_line_errors():
    """Inside a click command (``mergekit-yaml``), print an :class:`LrpError` as one line
    (click's ``Error: ...``) instead of a traceback; library callers get the exception."""
    try:
        yield
    except LrpError as error:
        import click

        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(str(error)) from None


@contextlib.contextmanager
def long_lived_objects_frozen():
    """The objects alive before the merge (imported modules, the checks' planner) left
    out of Python's cyclic garbage collection until it ends (``gc.freeze``). A full
    collection scans them all, and with mergekit's and transformers' pydantic validators
    among them one scan costs seconds; the checks' allocations made one happen during a
    100M-parameter merge, 5-10 % of its time. Garbage made during the merge is
    collected as usual; the frozen objects return to the collector afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def guard_run_merge(merge_module: ModuleType) -> None:
    """Replace ``merge_module.run_merge`` with the guarded version (idempotent)."""
    original = merge_module.run_merge
    if getattr(original, "__mergekit_lrp_guard__", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method not in METHODS:
            return original(merge_config, out_path, options, config_source=config_source)
        return guarded_merge(original, merge_config, out_path, options, config_source)

    run_merge.__mergekit_lrp_guard__ = True
    merge_module.run_merge = run_merge


def guarded_merge(original, merge_config, out_path, options, config_source=None):
    """Steps 1-6 of the module doc around mergekit's ``original`` run_merge."""
    from mergekit.merge_methods.registry import get

    from mergekit_lrp.merging.caches import clear_merge_caches
    from mergekit_lrp.merging.model_card import write_card_and_config
    from mergekit_lrp.merging.preflight import check_merge
    from mergekit_lrp.merging.provenance import draw_seed, record
    from mergekit_lrp.merging.staging import staged_directory
    from mergekit_lrp.versions import warn_if_untested

    warn_if_untested()
    with one_line_errors():
        check_merge(merge_config, options, out_path)
        seed_drawn = options.random_seed is None
        seed = draw_seed() if seed_drawn else options.random_seed
        options = options.model_copy(update={"random_seed": seed})
        method_spec = get(merge_config.merge_method).spec
        device = str(getattr(options, "device", None) or "cpu")
        provenance = record(merge_config, method_spec, seed, seed_drawn, device)
        inner = options.model_copy(update={"write_model_card": False})
        try:
            with staged_directory(out_path) as staging, long_lived_objects_frozen():
                result = original(merge_config, staging, inner, config_source=config_source)
                if options.write_model_card:
                    write_card_and_config(
                        Path(staging), Path(out_path), merge_config, config_source, provenance
                    )
        finally:
            clear_merge_caches()
        return result

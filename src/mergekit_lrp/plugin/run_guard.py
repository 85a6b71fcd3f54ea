"""Wrap ``mergekit.merge.run_merge`` so merges with this project's methods (``lrp``,
``circuit``) are checked first and staged.

Other merge methods go straight to mergekit's own ``run_merge``, untouched.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import ModuleType

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.model_card import finish_model_card, lrp_section
from mergekit_lrp.merging.preflight import check_merge
from mergekit_lrp.merging.staging import staged_directory
from mergekit_lrp.plugin.registration import METHODS


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


def guard_run_merge(merge_module: ModuleType) -> None:
    """Replace ``merge_module.run_merge`` with the guarded version (idempotent)."""
    original = merge_module.run_merge
    if getattr(original, "__mergekit_lrp_guard__", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        method = merge_config.merge_method
        if method not in METHODS:
            return original(merge_config, out_path, options, config_source=config_source)
        with one_line_errors():
            check_merge(merge_config, options)
            section = None
            if method == "lrp":
                section = lrp_section(merge_config)  # before mergekit rewrites the config
            with staged_directory(out_path) as staging:
                result = original(merge_config, staging, options, config_source=config_source)
                if section is not None and options.write_model_card:
                    finish_model_card(Path(staging), Path(out_path), section)
            return result

    run_merge.__mergekit_lrp_guard__ = True
    merge_module.run_merge = run_merge

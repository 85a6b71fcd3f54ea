"""Wrap ``mergekit.merge.run_merge`` so ``lrp`` merges are checked first and staged.

Other merge methods go straight to mergekit's own ``run_merge``, untouched.
"""

from __future__ import annotations

import functools
from types import ModuleType

from mergekit_lrp.merging.preflight import preflight
from mergekit_lrp.merging.staging import staged_directory


def guard_run_merge(merge_module: ModuleType) -> None:
    """Replace ``merge_module.run_merge`` with the guarded version (idempotent)."""
    original = merge_module.run_merge
    if getattr(original, "__mergekit_lrp_guard__", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None):
        if merge_config.merge_method != "lrp":
            return original(merge_config, out_path, options, config_source=config_source)
        preflight(merge_config, options)
        with staged_directory(out_path) as staging:
            return original(merge_config, staging, options, config_source=config_source)

    run_merge.__mergekit_lrp_guard__ = True
    merge_module.run_merge = run_merge

"""Fixes to mergekit's planner, applied by the plugin to the mergekit versions they fit.

One patch a module: :mod:`.referenced_models` (deterministic architecture choice),
:mod:`.slerp_optional_t` (slerp tensors without `t` keep the base weight),
:mod:`.mtp_passthrough` (MTP tensors merged, not dropped), :mod:`.converted_optional`
(MoE experts present in only some layers). Each says what it fixes; tests/test_planner.py
and tests/test_hybrid_planner.py show the failure without it (docs/hybrid.md lists what mergekit
0.1.5 already handles).
"""

from __future__ import annotations

import importlib.metadata
import warnings

PATCHED_MERGEKIT_VERSIONS = ("0.1.5",)
# what each patch replaced, for tests and for anyone comparing behaviour
ORIGINALS: dict[str, object] = {}


def mergekit_version_is_patched(fix: str = "") -> bool:
    """Whether the installed mergekit is one the patches were written for; if not, warn
    that ``fix`` is off (mergekit works as it is, without that fix)."""
    version = importlib.metadata.version("mergekit")
    if version in PATCHED_MERGEKIT_VERSIONS:
        return True
    if fix:
        warnings.warn(
            f"mergekit-lrp: the planner fix '{fix}' is off for mergekit {version} (written for "
            f"{', '.join(PATCHED_MERGEKIT_VERSIONS)}); merges run with mergekit's own planner",
            stacklevel=2,
        )
    return False

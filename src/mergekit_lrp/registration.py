"""Register the ``lrp`` method with mergekit's merge-method registry."""

from __future__ import annotations

import os
import sys
from types import ModuleType


def register_with(registry: ModuleType) -> None:
    """Add ``lrp`` to ``registry`` unless it is already there (idempotent).

    Called by the start-up import hook right after mergekit's registry module
    executes; a method named ``lrp`` that is not ours is left alone, loudly. When the
    registry was imported *by* ``mergekit_lrp.method`` (still half-initialised), that
    module registers itself once it is complete (:func:`register_if_registry_loaded`).
    """
    importing = sys.modules.get("mergekit_lrp.method")
    if importing is not None and not hasattr(importing, "lrp_merge"):
        return
    from mergekit_lrp.method import lrp_merge

    existing = {method.spec.name: method for method in registry.registered_methods()}
    current = existing.get(lrp_merge.spec.name)
    if current is lrp_merge:
        return
    if current is not None:
        raise RuntimeError(
            "mergekit already has a merge method named 'lrp' that is not mergekit-lrp's"
        )
    registry.register(lrp_merge)


def register_if_registry_loaded() -> None:
    """Register now if mergekit's registry is loaded and the plugin is not disabled."""
    registry = sys.modules.get("mergekit.merge_methods.registry")
    disabled = os.environ.get("MERGEKIT_LRP_DISABLE", "") not in ("", "0")
    if registry is not None and hasattr(registry, "registered_methods") and not disabled:
        register_with(registry)


def register() -> None:
    """Register explicitly, for interpreters started without site (``python -S``)."""
    from mergekit.merge_methods import registry

    register_with(registry)

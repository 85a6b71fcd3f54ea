"""Register the ``lrp`` method with mergekit's merge-method registry."""

from __future__ import annotations

from types import ModuleType


def register_with(registry: ModuleType) -> None:
    """Add ``lrp`` to ``registry`` unless it is already there (idempotent).

    Called by the start-up import hook right after mergekit's registry module
    executes; a method named ``lrp`` that is not ours is left alone, loudly.
    """
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


def register() -> None:
    """Register explicitly, for interpreters started without site (``python -S``)."""
    from mergekit.merge_methods import registry

    register_with(registry)

"""Register the ``lrp`` method with mergekit's merge-method registry."""

from __future__ import annotations

import sys
from types import ModuleType

METHOD_MODULE = "mergekit_lrp.merging.method"


def register_with(registry: ModuleType) -> None:
    """Add ``lrp`` to ``registry`` unless it is already there (idempotent).

    Called right after mergekit's registry module executes. When that happens while
    the method module itself is being imported (it imports mergekit, which imports the
    registry), the method does not exist yet: :func:`register_method` registers it as
    soon as its module is complete. A method named ``lrp`` that is not ours is left
    alone, loudly.
    """
    importing = sys.modules.get(METHOD_MODULE)
    if importing is not None and not hasattr(importing, "lrp_merge"):
        return
    from mergekit_lrp.merging.method import lrp_merge

    existing = {method.spec.name: method for method in registry.registered_methods()}
    current = existing.get(lrp_merge.spec.name)
    if current is lrp_merge:
        return
    if current is not None:
        raise RuntimeError(
            "mergekit already has a merge method named 'lrp' that is not mergekit-lrp's"
        )
    registry.register(lrp_merge)


def register_method(method_module: ModuleType) -> None:
    """Called when the method module is complete: register it if the registry is loaded."""
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is not None and hasattr(registry, "registered_methods"):
        register_with(registry)


def hint_when_disabled(registry: ModuleType) -> None:
    """With ``MERGEKIT_LRP_DISABLE`` set, make mergekit's error for ``lrp`` say why."""
    get = registry.get

    def get_with_hint(name: str):
        try:
            return get(name)
        except RuntimeError as error:
            if name != "lrp":
                raise
            raise RuntimeError(
                f"{error}: mergekit-lrp is installed but disabled by MERGEKIT_LRP_DISABLE; "
                "unset it to use merge_method: lrp"
            ) from None

    registry.get = get_with_hint

"""Register the ``lrp`` method with mergekit's merge-method registry."""

from __future__ import annotations

import sys
from types import ModuleType

#: module -> the merge method it defines
METHODS = {
    "mergekit_lrp.merging.method": "lrp_merge",
    "mergekit_lrp.merging.circuit": "circuit_merge",
}


def register_with(registry: ModuleType) -> None:
    """Add ``lrp`` and ``circuit`` to ``registry`` unless they are there (idempotent).

    Called right after mergekit's registry module executes. When that happens while one
    of the method modules is being imported (it imports mergekit, which imports the
    registry), that method does not exist yet: :func:`register_method` registers it as
    soon as its module is complete. A method of the same name that is not ours is left
    alone, loudly.
    """
    import importlib

    for module_name, attribute in METHODS.items():
        importing = sys.modules.get(module_name)
        if importing is not None and not hasattr(importing, attribute):
            continue
        _register(registry, getattr(importlib.import_module(module_name), attribute))


def _register(registry: ModuleType, method) -> None:
    existing = {m.spec.name: m for m in registry.registered_methods()}
    current = existing.get(method.spec.name)
    if current is method:
        return
    if current is not None:
        raise RuntimeError(
            f"mergekit already has a merge method named {method.spec.name!r} that is not "
            "mergekit-lrp's"
        )
    registry.register(method)


def register_method(method_module: ModuleType) -> None:
    """Called when a method module is complete: register it if the registry is loaded."""
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is not None and hasattr(registry, "registered_methods"):
        _register(registry, getattr(method_module, METHODS[method_module.__name__]))


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

"""Register mergekit-lrp's merge methods with mergekit's merge-method registry."""

from __future__ import annotations

import sys
from types import ModuleType

from mergekit_lrp.merging.methods import METHODS


def register_with(registry: ModuleType) -> None:
    """Add every method of :data:`METHODS` to ``registry`` unless it is there (idempotent).

    Called right after mergekit's registry module executes. When that happens while one
    of the method modules is being imported (it imports mergekit, which imports the
    registry), that method does not exist yet: :func:`register_method` registers it as
    soon as its module is complete. A method of the same name that is not ours is left
    alone, loudly.
    """
    for spec in METHODS.values():
        importing = sys.modules.get(spec.kernel_module)
        if importing is not None and not hasattr(importing, spec.kernel):
            continue
        _register(registry, spec.registered())


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
    if registry is None or not hasattr(registry, "registered_methods"):
        return
    for spec in METHODS.values():
        if spec.kernel_module == method_module.__name__:
            _register(registry, getattr(method_module, spec.kernel))


def hint_when_disabled(registry: ModuleType) -> None:
    """With ``MERGEKIT_LRP_DISABLE`` set, make mergekit's error for our methods say why
    (one line under ``mergekit-yaml``)."""
    get = registry.get

    def get_with_hint(name: str):
        try:
            return get(name)
        except RuntimeError as error:
            if name not in METHODS:
                raise
            message = (
                f"{error}: mergekit-lrp is installed but disabled by MERGEKIT_LRP_DISABLE; "
                f"unset it to use merge_method: {name}"
            )
            import click

            if click.get_current_context(silent=True) is not None:  # mergekit-yaml
                raise click.ClickException(message) from None
            raise RuntimeError(message) from None

    registry.get = get_with_hint

"""Arm the plugin at interpreter start-up (run by ``mergekit_lrp.pth``).

mergekit discovers no plugins, so this module installs an import hook that runs a
callback right after selected mergekit modules finish executing: the merge-method
registry (to register every method of :data:`.merging.methods.METHODS`),
``mergekit.merge`` (to guard ``run_merge``) and the planner modules that
:mod:`mergekit_lrp.plugin.planner` fixes.
Nothing heavy is imported here: programs that never import mergekit pay for a
dictionary lookup per import and nothing else.

Set ``MERGEKIT_LRP_DISABLE=1`` to start an interpreter without the plugin.
"""

import importlib
import importlib.abc
import os
import sys
import warnings

from mergekit_lrp.merging.methods import METHODS

# module name -> "module:function" (or a tuple of them, run in order) called with the
# freshly executed module
AFTER_IMPORT = {
    "mergekit.config": "mergekit_lrp.plugin.planner.referenced_models:patch_config",
    "mergekit.architecture": "mergekit_lrp.plugin.planner.mtp_passthrough:patch_architecture",
    "mergekit.plan": (
        "mergekit_lrp.plugin.planner.converted_optional:patch_plan",
        "mergekit_lrp.plugin.planner.slerp_optional_t:patch_plan",
    ),
    "mergekit.merge_methods.registry": "mergekit_lrp.plugin.registration:register_with",
    **{
        spec.kernel_module: "mergekit_lrp.plugin.registration:register_method"
        for spec in METHODS.values()
    },
    "mergekit.merge": "mergekit_lrp.plugin.run_guard:guard_run_merge",
}


class _AfterImportLoader(importlib.abc.Loader):
    """Delegate to the real loader, then run the plugin's callback."""

    def __init__(self, loader, callback: str):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _run_callback(module, self._callback)
        except Exception as error:  # a broken plugin must not break mergekit itself
            warnings.warn(
                f"mergekit-lrp could not activate ({module.__name__}): {error!r}",
                stacklevel=2,
            )

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, callbacks: dict[str, str] | None = None):
        self.callbacks = AFTER_IMPORT if callbacks is None else callbacks

    def find_spec(self, fullname, path, target=None):
        callback = self.callbacks.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _AfterImportLoader(spec.loader, callback)
        return spec


def disabled() -> bool:
    """``MERGEKIT_LRP_DISABLE`` set to anything but empty or 0."""
    return os.environ.get("MERGEKIT_LRP_DISABLE", "") not in ("", "0")


def _run_callback(module, callback: str | tuple[str, ...]) -> None:
    for one in (callback,) if isinstance(callback, str) else callback:
        module_name, function = one.split(":")
        getattr(importlib.import_module(module_name), function)(module)


#: when disabled, only this: mergekit's "Unimplemented merge method lrp" says why
DISABLED_HINT = {
    "mergekit.merge_methods.registry": "mergekit_lrp.plugin.registration:hint_when_disabled",
}


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (idempotent)."""
    if disabled():
        sys.meta_path.insert(0, _AfterImportFinder(DISABLED_HINT))
        return
    if not any(getattr(f, "callbacks", None) is AFTER_IMPORT for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())


def activate() -> None:
    """Everything the start-up hook does, now: install the hook for modules not imported
    yet and run the callbacks of those already imported (for ``python -S``)."""
    if not any(getattr(f, "callbacks", None) is AFTER_IMPORT for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())
    for name, callback in AFTER_IMPORT.items():
        module = sys.modules.get(name)
        if module is not None:
            _run_callback(module, callback)


install()

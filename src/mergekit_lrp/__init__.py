"""AttnLRP relevance-guided merging for mergekit.

Importing this package is cheap: it imports neither torch nor mergekit. The merge
method is registered with mergekit when mergekit's method registry is imported
(see :mod:`mergekit_lrp.plugin.startup`). docs/ARCHITECTURE.md maps the package.

The notebook API (:mod:`mergekit_lrp.api`) is imported on first use of one of its
names: :func:`compute_scores`, :func:`read_scores`, :func:`merge_mask`.
"""

__version__ = "0.1.0"

_API = ("compute_scores", "read_scores", "merge_mask")


def __getattr__(name: str):
    if name in _API:
        from mergekit_lrp import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergekit_lrp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


def register() -> None:
    """Activate the plugin now, as the start-up hook does: register ``lrp``, guard
    ``run_merge`` (pre-merge checks, staged output) and patch mergekit's planner.

    Only needed where the start-up hook did not run (``python -S``)."""
    from mergekit_lrp.plugin.startup import activate

    activate()
    import mergekit.merge  # noqa: F401  (runs the callbacks of modules not yet imported)
    import mergekit.merge_methods.registry  # noqa: F401

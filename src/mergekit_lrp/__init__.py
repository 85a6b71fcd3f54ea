"""AttnLRP relevance-guided merging for mergekit.

Importing this package is cheap: it imports neither torch nor mergekit. The merge
method is registered with mergekit when mergekit's method registry is imported
(see :mod:`mergekit_lrp._startup`).
"""

__version__ = "0.1.0"


def register() -> None:
    """Register the ``lrp`` merge method now (normally done automatically)."""
    from mergekit_lrp.registration import register as _register

    _register()

"""The dependency versions mergekit-lrp is tested with, and a one-line warning outside them.

The tested ranges are the package's own declared requirements (``pyproject.toml``),
read back from its installed metadata, so they are written in one place. The project
patches transformers' module forwards and mergekit's planner at run time; a release
outside those ranges may change what they patch (the AttnLRP rules are verified on
every pass regardless, see :mod:`.scoring.attnlrp.context`).
"""

from __future__ import annotations

import functools
import sys
from importlib import metadata

#: the packages whose internals the project reaches into, checked at run time
WATCHED = ("transformers", "mergekit", "torch", "peft", "accelerate", "huggingface-hub")


@functools.cache
def tested_ranges() -> dict[str, str]:
    """Package name -> the version range this installation of mergekit-lrp declares."""
    from packaging.requirements import Requirement

    try:
        requirements = metadata.requires("mergekit-lrp") or []
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return {}
    ranges = {}
    for line in requirements:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        if requirement.marker is None and name in WATCHED and requirement.specifier:
            ranges[name] = str(requirement.specifier)
    return ranges


def untested_versions() -> list[str]:
    """One sentence for each watched package installed outside its tested range."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = []
    for name, spec in tested_ranges().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if not SpecifierSet(spec).contains(Version(installed), prereleases=True):
            found.append(
                f"{name} {installed} is outside the range mergekit-lrp is tested with "
                f"({spec}); going on, but results may differ"
            )
    return found


@functools.cache
def warn_if_untested() -> None:
    """Print each :func:`untested_versions` sentence once per process, as one line on
    stderr, and go on."""
    for sentence in untested_versions():
        print(f"warning: {sentence}", file=sys.stderr)

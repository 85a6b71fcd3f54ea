"""Write a directory completely or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# Moved last, so a directory holding them was finished.
_FINAL_FILES = ("model.safetensors.index.json", "config.json")


@contextlib.contextmanager
def staged_directory(out_path: str | os.PathLike) -> Iterator[str]:
    """Yield a hidden sibling of ``out_path`` to fill; move its files into place on success.

    On any exception (including KeyboardInterrupt) the staging directory is removed
    and ``out_path`` is left as it was. A process killed outright leaves only the
    hidden ``.<name>.partial-<pid>`` directory, which never looks like a model.
    """
    out = Path(out_path).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield str(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, out)


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging directory to ``out`` (a rename when ``out`` is free)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    if not out.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(f"output path {out} exists and is not a directory")
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in _FINAL_FILES, p.name))
    for entry in entries:
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()

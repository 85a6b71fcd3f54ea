"""Write an output directory completely or not at all, and replace an earlier one whole.

The merge fills a hidden sibling of the output (``.<name>.partial-<pid>``); only when it
is complete does it take the output's place. A folder that held an earlier merge is
replaced by the new one, never mixed with it: its weights and index go with it (they
could otherwise outlive it beside the new shards) and the files the new merge writes
replace theirs, while anything else in it (a user's own notes or evaluation results)
is moved into the new output. A non-empty folder that holds no model is refused before
the merge starts (:func:`check_output_folder`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mergekit_lrp.errors import LrpError

#: files that mark a folder as a model or merge output, which a new merge may replace
MODEL_FILES = ("config.json", "mergekit_config.yml", "model.safetensors.index.json")
#: an earlier output's files that leave with it even where the new merge writes no file
#: of that name: weights and their index, which would mix two models in one folder
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.index.json")


class OutputFolderError(LrpError):
    """The output path cannot take a merge."""


def check_output_folder(out_path: str | os.PathLike) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not a model or
    merge output (a new merge replaces the folder's contents as a whole)."""
    out = Path(out_path)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output path {out} exists and is not a folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries or _holds_a_model(out):
        return
    shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
    raise OutputFolderError(
        f"output folder {out} is not empty and holds no model ({shown}); a merge replaces "
        "its output folder as a whole, so choose a new or empty folder"
    )


def _holds_a_model(folder: Path) -> bool:
    return any((folder / name).exists() for name in MODEL_FILES) or any(
        folder.glob("*.safetensors")
    )


@contextlib.contextmanager
def staged_directory(out_path: str | os.PathLike) -> Iterator[str]:
    """Yield a hidden sibling of ``out_path`` to fill; it becomes ``out_path`` on success.

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
    """Make the finished ``staging`` directory ``out``: a rename, after moving an earlier
    output aside; once the new one is in place, the earlier one's files that are neither
    weights nor written anew are moved into it, and the rest is removed."""
    if out.exists() and not out.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputFolderError(f"output path {out} exists and is not a folder")
    previous = None
    if out.is_dir():
        previous = out.parent / f".{out.name}.replaced-{os.getpid()}"
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out, previous)
    os.replace(staging, out)
    if previous is not None:
        for entry in sorted(previous.iterdir()):
            if not (out / entry.name).exists() and not _is_weights(entry):
                os.replace(entry, out / entry.name)
        shutil.rmtree(previous, ignore_errors=True)


def _is_weights(path: Path) -> bool:
    return path.is_file() and any(path.match(pattern) for pattern in WEIGHT_PATTERNS)

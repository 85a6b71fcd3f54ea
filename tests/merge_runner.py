"""Run merges through mergekit's real entry points and read the result: in-process
(``run_merge``, as a library caller) or as the ``mergekit-yaml`` command (as a user)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

#: the venv's bin directory: mergekit-yaml, lrp-compute, lrp-inspect
BIN = Path(sys.executable).parent


def run(config: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    """``run_merge`` in this process with ``MergeOptions(quiet=True, **options)``."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        MergeOptions(quiet=True, **options),
    )
    return read_weights(out)


def mergekit_yaml(
    config: dict, out: Path, *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``mergekit-yaml CONFIG OUT *args`` in a fresh process (config written beside OUT),
    with ``env`` added to this process's environment, in ``cwd``."""
    path = Path(out).parent / f"{Path(out).name}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        cwd=cwd,
    )


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors

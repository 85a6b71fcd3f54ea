"""Run merges in-process through mergekit's real path and read the result."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def run(config: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        MergeOptions(quiet=True, **options),
    )
    return read_weights(out)


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors

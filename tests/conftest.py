"""Fixtures shared by the test modules (helpers they import live in ordinary modules)."""

import os
from pathlib import Path

import pytest
import torch
from checkpoints import finetune_of, save, synthetic_scores, tiny_llama

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, two stand-in fine-tunes and a valid synthetic score file for each."""
    root = tmp_path_factory.mktemp("family")
    base = save(tiny_llama(seed=0), root / "base")
    paths = {"base": base}
    for index, name in enumerate(("ft_a", "ft_b"), start=1):
        paths[name] = finetune_of(base, root / name, seed=index)
        paths[f"{name}_scores"] = synthetic_scores(
            paths[name], root / f"{name}.safetensors", seed=10 + index
        )
    return paths


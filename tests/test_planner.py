"""Planner fixes, each shown to be needed: the test fails without the plugin's patch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoints import VOCAB, finetune_of, save, tiny_llama
from tiny_models import make_tiny_model

BIN = Path(sys.executable).parent
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def cross_family(tmp_path_factory):
    """A tiny Llama base, a Llama fine-tune, and a same-size Qwen3 (it has k_norm/q_norm)."""
    root = tmp_path_factory.mktemp("cross")
    base = save(tiny_llama(seed=0), root / "llama-base")
    finetune_of(base, root / "llama-ft", seed=1)
    qwen = make_tiny_model("qwen3", randomise_vectors=False, vocab_size=VOCAB)
    save(qwen, root / "qwen3")
    return root


def merge_in_fresh_process(root: Path, config: dict, seed: int):
    path = root / f"config-{seed}.yml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-{seed}-{len(config.get('base_model') or '')}"
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out), "--allow-crimes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=root,
    )
    if result.returncode != 0:
        return "failed: " + result.stderr.strip().splitlines()[-1]
    return json.loads((out / "config.json").read_text())["architectures"][0]


def test_cross_family_merge_takes_the_base_architecture_in_every_process(cross_family):
    root = cross_family
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "./llama-base",
        "models": [
            {"model": "./qwen3", "parameters": {"weight": 0.5}},
            {"model": "./llama-ft", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    with_plugin = {seed: merge_in_fresh_process(root, config, seed) for seed in SEEDS}
    assert set(with_plugin.values()) == {"LlamaForCausalLM"}, with_plugin


def test_unpatched_mergekit_puts_a_non_base_model_first():
    """Why the patch exists: mergekit 0.1.5 lists referenced models in set order.

    Its order is not pinned by PYTHONHASHSEED either (measured: the same seed gave
    different orders in different processes), so the failure is shown in-process over
    many configs instead of over hash seeds.
    """
    from mergekit.config import MergeConfiguration

    from mergekit_lrp.plugin.planner import ORIGINALS

    unpatched, patched = [], []
    for i in range(20):
        config = MergeConfiguration.model_validate(
            {
                "merge_method": "linear",
                "base_model": f"./base-{i}",
                "models": [
                    {"model": f"./{name}-{i}", "parameters": {"weight": 1.0}}
                    for name in ("qwen", "llama")
                ],
            }
        )
        unpatched.append(ORIGINALS["referenced_models"](config)[0].model.path)
        patched.append(config.referenced_models()[0].model.path)
    assert patched == [f"./base-{i}" for i in range(20)]
    assert any(not first.startswith("./base") for first in unpatched), unpatched


def test_without_base_the_first_listed_model_decides(cross_family):
    root = cross_family
    config = {
        "merge_method": "linear",
        "models": [
            {"model": "./llama-ft", "parameters": {"weight": 0.5}},
            {"model": "./llama-base", "parameters": {"weight": 0.5}},
            {"model": "./qwen3", "parameters": {"weight": 0.0}},
        ],
        "dtype": "float32",
    }
    results = {seed: merge_in_fresh_process(root, config, seed) for seed in (6, 7)}
    assert set(results.values()) == {"LlamaForCausalLM"}, results

"""Planner fixes, each shown to be needed: the test fails without the plugin's patch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoints import finetune_of, save, tiny_llama
from transformers import Qwen3Config, Qwen3ForCausalLM

BIN = Path(sys.executable).parent
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def cross_family(tmp_path_factory):
    """A tiny Llama base, a Llama fine-tune, and a same-size Qwen3 (it has k_norm/q_norm)."""
    root = tmp_path_factory.mktemp("cross")
    base = save(tiny_llama(seed=0), root / "llama-base")
    finetune_of(base, root / "llama-ft", seed=1)
    qwen = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=104,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
        )
    )
    save(qwen, root / "qwen3")
    return root


def merge_in_fresh_process(root: Path, config: dict, seed: int, plugin: bool):
    path = root / f"config-{seed}-{plugin}.yml"
    path.write_text(yaml.safe_dump(config))
    out = root / f"out-{seed}-{plugin}-{len(config.get('base_model') or '')}"
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "MERGEKIT_LRP_DISABLE": "" if plugin else "1"}
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out), "--allow-crimes"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if result.returncode != 0:
        return "failed: " + result.stderr.strip().splitlines()[-1]
    return json.loads((out / "config.json").read_text())["architectures"][0]


def test_cross_family_merge_takes_the_base_architecture_in_every_process(cross_family):
    root = cross_family
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "llama-base"),
        "models": [
            {"model": str(root / "qwen3"), "parameters": {"weight": 0.5}},
            {"model": str(root / "llama-ft"), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }
    with_plugin = {seed: merge_in_fresh_process(root, config, seed, True) for seed in SEEDS}
    assert set(with_plugin.values()) == {"LlamaForCausalLM"}, with_plugin
    without = {seed: merge_in_fresh_process(root, config, seed, False) for seed in SEEDS}
    assert len(set(without.values())) > 1, f"mergekit alone was deterministic here: {without}"


def test_without_base_the_first_listed_model_decides(cross_family):
    root = cross_family
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(root / "llama-ft"), "parameters": {"weight": 0.5}},
            {"model": str(root / "llama-base"), "parameters": {"weight": 0.5}},
            {"model": str(root / "qwen3"), "parameters": {"weight": 0.0}},
        ],
        "dtype": "float32",
    }
    results = {seed: merge_in_fresh_process(root, config, seed, True) for seed in SEEDS[:2]}
    assert set(results.values()) == {"LlamaForCausalLM"}, results

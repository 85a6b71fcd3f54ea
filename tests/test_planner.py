"""Planner fixes, each shown to be needed: the test fails without the plugin's patch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import VOCAB, finetune_of, save
from tiny_models import AS_CHECKPOINT, make_tiny_model

BIN = Path(sys.executable).parent
SEEDS = (1, 2)  # two fresh interpreters: set order differs between them (see below)


@pytest.fixture(scope="module")
def cross_family(tmp_path_factory):
    """A tiny Llama base, a Llama fine-tune, and a same-size Qwen3 (it has k_norm/q_norm)."""
    root = tmp_path_factory.mktemp("cross")
    base = save(make_tiny_model("llama", seed=0, **AS_CHECKPOINT), root / "llama-base")
    finetune_of(base, root / "llama-ft", seed=1)
    qwen = make_tiny_model("qwen3", seed=7, randomise_vectors=False, vocab_size=VOCAB)
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


# ---------------------------------------------------------------- slerp with t optional
# (mergekit feature request: filtered, component-wise cross-family merges)

MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def slerp_config(root: Path, t, moved: bool = False) -> dict:
    """slerp of the Llama base with the Qwen3 model; ``moved`` maps each output layer i
    to Qwen3's layer 1 - i (base layer 0 from the other family's layer 1, and back)."""
    if moved:
        slices = [
            {
                "sources": [
                    {"model": str(root / "llama-base"), "layer_range": [i, i + 1]},
                    {"model": str(root / "qwen3"), "layer_range": [1 - i, 2 - i]},
                ]
            }
            for i in (0, 1)
        ]
    else:
        slices = [
            {
                "sources": [
                    {"model": str(root / "llama-base"), "layer_range": [0, 2]},
                    {"model": str(root / "qwen3"), "layer_range": [0, 2]},
                ]
            }
        ]
    return {
        "merge_method": "slerp",
        "base_model": str(root / "llama-base"),
        "slices": slices,
        "parameters": {"t": t},
        "dtype": "float32",
    }


def checkpoint_weights(path: Path) -> dict:
    from merge_runner import read_weights

    return read_weights(path)


def slerp_of(t: float, v0, v1):
    from mergekit.merge_methods.slerp import slerp

    return slerp(torch.tensor([t]), v0[None], v1[None])[0]


def test_slerp_without_t_keeps_the_base_weight(cross_family, tmp_path):
    from merge_runner import run

    root = cross_family
    t = [{"filter": name, "value": 0.5} for name in MLP]
    merged = run(slerp_config(root, t), tmp_path / "out", allow_crimes=True)
    base = checkpoint_weights(root / "llama-base")
    other = checkpoint_weights(root / "qwen3")
    assert set(merged) == set(base)  # the base's architecture: no q_norm / k_norm
    for name, tensor in merged.items():
        if any(part in name for part in MLP):
            torch.testing.assert_close(tensor, slerp_of(0.5, base[name], other[name]))
            assert not torch.equal(tensor, base[name])
        else:  # attention, norms, embeddings, head: no t, base kept exactly
            assert torch.equal(tensor, base[name]), name


def test_unpatched_slerp_requires_t_for_every_tensor(cross_family, tmp_path, monkeypatch):
    """Why the patch exists: mergekit 0.1.5 refuses a slerp with t for some tensors."""
    from merge_runner import run
    from mergekit.plan import MergePlanner

    from mergekit_lrp.plugin.planner import ORIGINALS

    t = [{"filter": "mlp", "value": 0.5}]
    monkeypatch.setattr(MergePlanner, "plan_tensor", ORIGINALS["plan_tensor"])
    with pytest.raises(RuntimeError, match="Missing required parameter t"):
        run(slerp_config(cross_family, t), tmp_path / "out", allow_crimes=True)


def test_slerp_with_t_everywhere_is_unchanged_by_the_patch(cross_family, tmp_path, monkeypatch):
    from merge_runner import run
    from mergekit.plan import MergePlanner

    from mergekit_lrp.plugin.planner import ORIGINALS

    config = slerp_config(cross_family, [0.2, 0.8])
    patched = run(config, tmp_path / "patched", allow_crimes=True)
    monkeypatch.setattr(MergePlanner, "plan_tensor", ORIGINALS["plan_tensor"])
    unpatched = run(config, tmp_path / "unpatched", allow_crimes=True)
    assert patched.keys() == unpatched.keys()
    for name in patched:
        assert torch.equal(patched[name], unpatched[name]), name


# ---------------------------------------------------------------- layers moved by slices


def test_mergekit_methods_map_layers_across_families_through_slices(cross_family, tmp_path):
    """Output layer i from the base's layer i and the Qwen3 model's layer 1 - i: mergekit's
    own methods do it (here slerp, t only for the MLP, so with the patch above)."""
    from merge_runner import run

    root = cross_family
    t = [{"filter": name, "value": 0.5} for name in MLP]
    merged = run(slerp_config(root, t, moved=True), tmp_path / "out", allow_crimes=True)
    base = checkpoint_weights(root / "llama-base")
    other = checkpoint_weights(root / "qwen3")
    for i in (0, 1):
        for part in MLP:
            name = f"model.layers.{i}.{part}.weight"
            source = f"model.layers.{1 - i}.{part}.weight"
            torch.testing.assert_close(merged[name], slerp_of(0.5, base[name], other[source]))
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(merged[name], base[name])


def test_unpatched_mergekit_already_maps_layers_through_slices(cross_family, tmp_path, monkeypatch):
    """The mapping itself is mergekit's: without any plugin patch of the planner, a slerp
    with one t takes output layer i from the Qwen3 model's layer 1 - i."""
    from merge_runner import run
    from mergekit.plan import MergePlanner

    from mergekit_lrp.plugin.planner import ORIGINALS

    root = cross_family
    monkeypatch.setattr(MergePlanner, "plan_tensor", ORIGINALS["plan_tensor"])
    merged = run(slerp_config(root, 0.3, moved=True), tmp_path / "out", allow_crimes=True)
    base = checkpoint_weights(root / "llama-base")
    other = checkpoint_weights(root / "qwen3")
    for i in (0, 1):
        name = f"model.layers.{i}.self_attn.o_proj.weight"
        source = f"model.layers.{1 - i}.self_attn.o_proj.weight"
        torch.testing.assert_close(merged[name], slerp_of(0.3, base[name], other[source]))


def test_lrp_refuses_moved_layers_saying_why_and_what_to_do(cross_family, tmp_path):
    from checkpoints import synthetic_scores
    from merge_runner import run

    from mergekit_lrp.merging.parameters import LRPConfigError

    root = cross_family
    scores = synthetic_scores(root / "llama-ft", tmp_path / "ft.safetensors", seed=5)
    config = {
        "merge_method": "lrp",
        "base_model": str(root / "llama-base"),
        "slices": [
            {
                "sources": [
                    {"model": str(root / "llama-base"), "layer_range": [i, i + 1]},
                    {
                        "model": str(root / "llama-ft"),
                        "layer_range": [1 - i, 2 - i],
                        "parameters": {"lrp_scores": str(scores)},
                    },
                ]
            }
            for i in (0, 1)
        ],
        "parameters": {"density": 0.5},
        "dtype": "float32",
    }
    with pytest.raises(LRPConfigError) as raised:
        run(config, tmp_path / "out")
    message = str(raised.value)
    assert "model.layers.1." in message and "model.layers.0." in message  # what moved
    assert "a slice moves its layers" in message
    assert "looked up by the output tensor's name" in message  # why
    assert "score it with lrp-compute" in message and "slerp, linear" in message  # the fix
    assert not (tmp_path / "out").exists()

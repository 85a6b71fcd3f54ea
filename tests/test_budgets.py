"""Layer and model budgets: kept entries shared among tensors by their relevance mass."""

import pytest
from checkpoints import synthetic_scores
from helpers import lrp_config
from merge_runner import run
from safetensors.torch import load_file

from mergekit_lrp.merging.budgets import allocate, group_of


def test_allocation_follows_relevance_mass():
    densities = allocate({"a": (100, 30.0), "b": (100, 10.0)}, 0.4)
    assert densities == pytest.approx({"a": 0.6, "b": 0.2})  # 80 entries split 3:1


def test_a_tensor_is_capped_at_all_of_its_entries_and_the_rest_goes_elsewhere():
    densities = allocate({"a": (10, 90.0), "b": (100, 10.0)}, 0.5)
    assert densities == pytest.approx({"a": 1.0, "b": 0.45})  # 55 entries: 10 + 45


def test_groups():
    assert group_of("model.layers.12.mlp.up_proj.weight", "layer") == "model.layers.12"
    assert group_of("mtp.layers.0.mlp.up_proj.weight", "layer") == "mtp.layers.0"  # its own
    assert group_of("model.layers.12.mlp.up_proj.weight", "model") == "model"
    assert group_of("lm_head.weight", "layer") == "outside the layers"


def test_layer_budget_moves_entries_to_the_relevant_tensor(family, tmp_path):
    scores = load_file(family["ft_a_scores"])
    hot = "model.layers.0.mlp.up_proj.weight"
    scores[hot] = scores[hot] * 10  # ten times the relevance mass of its size
    path = synthetic_scores(family["ft_a"], tmp_path / "hot.safetensors", seed=0, tensors=scores)
    per_model = {"ft_a": {"lrp_scores": str(path)}, "ft_b": {"weight": 0.0}}
    base = load_file(family["base"] / "model.safetensors")
    kept = {}
    for budget in ("tensor", "layer"):
        config = lrp_config(family, per_model=per_model, budget=budget, density=0.3)
        merged = run(config, tmp_path / budget)
        kept[budget] = {
            name: int((merged[name] != base[name]).sum())
            for name in merged
            if name.startswith("model.layers.0.") and merged[name].ndim == 2
        }
    assert kept["layer"][hot] > kept["tensor"][hot]
    total = sum(base[n].numel() for n in kept["tensor"])
    assert sum(kept["layer"].values()) == pytest.approx(0.3 * total, rel=0.01)
    assert sum(kept["tensor"].values()) == pytest.approx(0.3 * total, rel=0.01)

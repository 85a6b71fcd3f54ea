"""Circuit-Merge as a registered method: drop rates, priority, sign conflicts, threshold."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import lrp_config
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.methods.circuit import accumulate, keep_rate
from mergekit_lrp.merging.parameters import LRPConfigError

BIN = Path(sys.executable).parent


def circuit(deltas, **parameters) -> torch.Tensor:
    base = torch.zeros_like(deltas[0])
    models = {"base": {"w": base}}
    models.update({f"m{i}": {"w": base + d} for i, d in enumerate(deltas)})
    return merge_state_dicts(models, "circuit", base="base", parameters=parameters)["w"]


def test_drop_rates_fall_with_priority_as_the_seed_defines():
    # three models, base drop 0.5, temperature 0: processed lowest priority first
    assert [keep_rate(i, 3, 0.0, 0.5) for i in (1, 2, 3)] == [0.25, 0.25, 0.5]
    # temperature 1: every model at 1 - base_droprate
    assert [keep_rate(i, 3, 1.0, 0.5) for i in (1, 2, 3)] == [0.5, 0.5, 0.5]
    assert keep_rate(2, 3, 0.5, 0.6) == pytest.approx(0.5 * 0.5**2 * 0.8 + 0.5 * 0.4)
    assert keep_rate(1, 1, 0.0, 0.5) == 0.0  # a single model drops 2 x base_droprate


def test_three_model_example_by_hand():
    """temperature 1 and base_droprate 0 keep everything, so the rules show alone.

    Listed (priority) order A, B, C; processed C, B, A.
      entry 0: C=+1, B=+2, A=+3, all agree: running mean -> (1 + 2 + 3) / 3 = 2
      entry 1: C=+1, B=-2 overwrites (conflict), A=-4 agrees with -2: mean of 2 -> -3
      entry 2: C=+1, B=+1, A=-5 overwrites: -5 (the highest priority wins the conflict)
      entry 3: below the meaningful-change threshold everywhere: base
    """
    a = torch.tensor([3.0, -4.0, -5.0, 1e-7])
    b = torch.tensor([2.0, -2.0, 1.0, 1e-7])
    c = torch.tensor([1.0, 1.0, 1.0, -1e-7])
    merged = circuit([a, b, c], temperature=1.0, base_droprate=0.0)
    torch.testing.assert_close(merged, torch.tensor([2.0, -3.0, -5.0, 0.0]))


def test_temperature_zero_decays_earlier_agreeing_contributions_geometrically():
    """Processed 1, then 2, then 4 (highest priority last), all agreeing."""
    values = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    # T = 0: each new one moves halfway: 1 -> 1.5 -> 2.75 (weights 1/4, 1/4, 1/2)
    assert accumulate(values, 0.0).item() == 2.75
    # T = 1: the plain average 7/3
    assert accumulate(values, 1.0).item() == pytest.approx(7 / 3)


def test_pruning_is_seeded_and_keeps_the_expected_share():
    torch.manual_seed(0)
    deltas = [torch.randn(64, 64) for _ in range(2)]
    torch.manual_seed(3)
    first = circuit(deltas, base_droprate=0.3, rescale=False)
    torch.manual_seed(3)
    second = circuit(deltas, base_droprate=0.3, rescale=False)
    assert torch.equal(first, second)
    # two models, T 0, base 0.3: both keep 0.5 ** 1 * 2 * 0.7 = 0.7 (positions count from 2)
    keep_low, keep_high = keep_rate(1, 2, 0.0, 0.3), keep_rate(2, 2, 0.0, 0.3)
    union = 1 - (1 - keep_low) * (1 - keep_high)
    assert abs(float((first != 0).float().mean()) - union) < 0.03


def test_a_spread_wider_than_a_low_keep_rate_leaves_no_probability_at_zero():
    """Four models keep 0.125, 0.125, 0.25, 0.5 of their entries; epsilon 0.2 would put the
    least important entries of the last-priority models at probability 0, and the 1/p
    rescale would turn them into NaN. The spread stops at half the keep rate instead."""
    torch.manual_seed(0)
    deltas = [torch.randn(300, 300) for _ in range(4)]
    torch.manual_seed(1)
    merged = circuit(deltas, epsilon=0.2)
    assert torch.isfinite(merged).all()
    assert 0.3 < float((merged != 0).float().mean()) < 0.9


def circuit_config(family, **parameters) -> dict:
    """The family's two fine-tunes (with their score files) under ``circuit``."""
    config = lrp_config(family)
    for model in config["models"]:
        del model["parameters"]["weight"]
    return {**config, "merge_method": "circuit", "parameters": parameters}


def test_drop_order_from_score_files_changes_the_merge(family, tmp_path):
    config = circuit_config(family, base_droprate=0.3, epsilon=0.2)
    from merge_runner import run

    magnitude = run(config, tmp_path / "magnitude", random_seed=0)
    config["parameters"]["drop_order"] = "scores"
    scores = run(config, tmp_path / "scores", random_seed=0)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(magnitude[name], scores[name])


def test_circuit_runs_under_mergekit_yaml(family, tmp_path):
    config = circuit_config(family)
    path = tmp_path / "circuit.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "out"), "--random-seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize(
    "parameters, fragment",
    [
        ({"temperature": 1.5}, "temperature must be in"),
        ({"base_droprate": 1.0}, "base_droprate must be in"),
        ({"drop_order": "random"}, "drop_order must be one of magnitude, scores"),
    ],
)
def test_bad_parameters(parameters, fragment):
    with pytest.raises(LRPConfigError, match=fragment):
        circuit([torch.ones(2)], **parameters)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c["parameters"].update(temprature=0.5), "did you mean 'temperature'"),
        (lambda c: c["models"][0]["parameters"].update(weight=1.0), "unknown parameter 'weight'"),
        (lambda c: c["models"][1]["parameters"].pop("lrp_scores"), "needs an lrp_scores file"),
        (  # model b's scores given for model a
            lambda c: c["models"][0]["parameters"].update(
                lrp_scores=c["models"][1]["parameters"]["lrp_scores"]
            ),
            "computed on a different checkpoint",
        ),
    ],
)
def test_circuit_is_checked_before_anything_is_written(family, tmp_path, change, fragment):
    from merge_runner import run

    config = circuit_config(family, drop_order="scores")
    change(config)
    with pytest.raises(LrpError, match=fragment):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def reference_accumulate(pruned, temperature):
    """The accumulation written out entry-rule by entry-rule, as it was first computed."""
    accumulated = torch.zeros_like(pruned[0])
    contributions = torch.zeros_like(pruned[0], dtype=torch.int32)
    for delta in pruned:
        present = delta != 0
        first = present & (contributions == 0)
        conflict = present & ~first & (torch.sign(delta) != torch.sign(accumulated))
        agree = present & ~first & ~conflict
        alpha = (1 - temperature) * 0.5 + temperature / (contributions.float() + 1)
        accumulated = torch.where(first | conflict, delta, accumulated)
        accumulated = torch.where(agree, accumulated + alpha * (delta - accumulated), accumulated)
        contributions = torch.where(conflict, 1, contributions + present.int())
    return accumulated


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_accumulate_gives_the_bits_of_the_rule_by_rule_formulation(temperature, count):
    g = torch.Generator().manual_seed(count)
    pruned = []
    for _ in range(count):
        delta = torch.randn(40, 30, generator=g)
        delta = delta * (torch.rand(40, 30, generator=g) < 0.6)  # dropped entries: +-0.0
        pruned.append(delta)
    expected = reference_accumulate(pruned, temperature)
    found = accumulate([d.clone() for d in pruned], temperature)
    assert torch.equal(found.view(torch.int32), expected.view(torch.int32))

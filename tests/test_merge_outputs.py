"""What a merge leaves on disk: the same bytes for the same seed, a seed recorded when none
was given, an output folder replaced whole, never mixed with an earlier merge."""

import pytest
import torch
import yaml
from helpers import STOCHASTIC_RULE, lrp_config
from merge_runner import read_weights, run

from mergekit_lrp.errors import LrpError


def test_lrp_merges_are_byte_identical_for_one_seed(family, tmp_path):
    first = run(lrp_config(family, rule=STOCHASTIC_RULE), tmp_path / "one", random_seed=5)
    second = run(lrp_config(family, rule=STOCHASTIC_RULE), tmp_path / "two", random_seed=5)
    assert all(torch.equal(first[n], second[n]) for n in first)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_without_a_seed_one_is_drawn_recorded_and_reproduces_the_bytes(family, tmp_path):
    """The saved config writes out every default and the drawn seed; merging that file
    again with that seed gives the same bytes (and another seed other weights)."""
    from mergekit.config import MergeConfiguration

    from mergekit_lrp.merging.methods.lrp import DEFAULTS

    first = run(lrp_config(family, rule={"selection": "stochastic"}), tmp_path / "first")
    saved_text = (tmp_path / "first" / "mergekit_config.yml").read_text()
    seed = int(saved_text.split("--random-seed ")[1].split()[0])
    assert "this seed was drawn" in saved_text and "mergekit-lrp" in saved_text
    saved = yaml.safe_load(saved_text)
    assert saved["parameters"]["selection"] == "stochastic"
    assert saved["parameters"]["consensus"] == DEFAULTS.consensus  # defaults written out
    assert saved["parameters"]["normalize"] is DEFAULTS.normalize
    config = MergeConfiguration.model_validate(saved).model_dump(mode="json", exclude_none=True)
    again = run(config, tmp_path / "again", random_seed=seed)
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = run(config, tmp_path / "other", random_seed=seed + 1)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert f"--random-seed {seed}" in (tmp_path / "first" / "README.md").read_text()


def test_a_reused_output_folder_is_replaced_whole(family, tmp_path):
    """A sharded merge, then an unsharded one into the same folder: no stale shard or
    index of the first is left beside the second's weights."""
    out = tmp_path / "out"
    run(lrp_config(family), out, random_seed=1, out_shard_size=5000)
    assert (out / "model.safetensors.index.json").is_file()
    merged = run(lrp_config(family), out, random_seed=1)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" not in names
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"]
    assert read_weights(out).keys() == merged.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left


def test_existing_output_directory_keeps_unrelated_files(family, tmp_path):
    """Merging again into an earlier merge's folder replaces the merge's own files (the
    stale shard goes) and keeps what the user put there, byte for byte."""
    out = tmp_path / "out"
    run(lrp_config(family), out, random_seed=1, out_shard_size=5000)
    (out / "my-eval-results.txt").write_text("accuracy 0.71\n")
    (out / "evals").mkdir()
    (out / "evals" / "run1.json").write_text("{}")
    (out / "README.md").write_text("overwritten by the new card")
    run(lrp_config(family), out, random_seed=2)
    assert (out / "my-eval-results.txt").read_text() == "accuracy 0.71\n"
    assert (out / "evals" / "run1.json").read_text() == "{}"
    assert "random-seed 2" in (out / "README.md").read_text()
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_holding_something_else_is_refused_before_merging(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LrpError, match="out is not empty and holds no model .notes.txt"):
        run(lrp_config(family), out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_models_draw_and_an_order_free_rule_do_not_depend_on_the_list_order(
    family, tmp_path
):
    """With consensus: unit and the default stochastic selection, listing the fine-tunes
    the other way round gives the same bytes; with priority it does not."""
    for rule, same in (("unit", True), ("priority", False)):
        config = lrp_config(family, rule={"consensus": rule})
        first = run(config, tmp_path / f"{rule}-ab", random_seed=3)
        config["models"] = config["models"][::-1]
        second = run(config, tmp_path / f"{rule}-ba", random_seed=3)
        assert all(torch.equal(first[n], second[n]) for n in first) == same, rule

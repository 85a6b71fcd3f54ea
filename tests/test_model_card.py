"""The merged model's README and saved config: named after the output, in words that follow
the settings used, written from local knowledge when mergekit's card cannot be."""

import shutil

import yaml
from helpers import STOCHASTIC_RULE, lrp_config
from merge_runner import mergekit_yaml, read_weights, run

from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY


def card_of(out) -> str:
    return (out / "README.md").read_text()


def test_model_card_names_the_output_the_method_and_the_score_files(family, tmp_path):
    run(lrp_config(family), tmp_path / "my-merge")
    card = card_of(tmp_path / "my-merge")
    assert "# my-merge" in card and "partial" not in card
    assert "How the weights were chosen (`lrp`, mergekit-lrp)" in card
    assert "ft_a.safetensors" in card and "ft_b.safetensors" in card
    assert "mean_abs_grad" in card and "attnlrp" in card


def test_the_wording_follows_the_selection_used(family, tmp_path):
    run(lrp_config(family, rule=STOCHASTIC_RULE), tmp_path / "stochastic", random_seed=11)
    stochastic = card_of(tmp_path / "stochastic")
    assert "probability that rises with its rank" in stochastic
    assert "seed 11" in stochastic and "first-listed fine-tune" in stochastic
    assert "highest relevance" not in stochastic
    run(lrp_config(family), tmp_path / "topk")  # top-k, kept deltas added
    topk = card_of(tmp_path / "topk")
    assert "kept the 0.5 of its entries of highest importance" in topk
    assert "were added" in topk and "probability" not in topk
    run(lrp_config(family, consensus="unit", normalize=True), tmp_path / "unit")
    unit = card_of(tmp_path / "unit")
    assert "in each output row the fine-tune with the most mass there wins" in unit
    assert "first-listed" not in unit and "agreeing entries averaged" in unit


def test_circuit_card_is_titled_with_the_output_and_says_how(family, tmp_path):
    config = lrp_config(family, rule={})
    config["merge_method"] = "circuit"
    config["parameters"] = {"drop_order": "scores"}
    for model in config["models"]:
        del model["parameters"]["weight"]
    run(config, tmp_path / "four-circuit", random_seed=2)
    card = card_of(tmp_path / "four-circuit")
    assert "# four-circuit" in card and ".partial" not in card
    assert "How the weights were chosen (`circuit`, mergekit-lrp)" in card
    assert "priority order" in card and "ft_b.safetensors" in card


def test_lrp_scores_given_through_filters_are_listed_as_files(family, tmp_path):
    path = str(family["ft_b_scores"])
    per_model = {"ft_b": {"lrp_scores": [{"filter": "self_attn", "value": path}, {"value": path}]}}
    run(lrp_config(family, per_model=per_model), tmp_path / "out")
    card = card_of(tmp_path / "out")
    rows = [line for line in card.splitlines() if "ft_b.safetensors" in line]
    assert rows and all("filter" not in row and "| ? |" not in row for row in rows)


def test_an_offline_card_failure_keeps_the_merge(family, tmp_path):
    """Offline, with `models/...` paths that read like hub ids, mergekit's card generator
    raises after every tensor was merged; the merge is published with a local card."""
    models = tmp_path / "models"
    for name in ("base", "ft_a", "ft_b"):
        shutil.copytree(family[name], models / name)
    shutil.copy(family["ft_a_scores"], models / "a.safetensors")
    shutil.copy(family["ft_b_scores"], models / "b.safetensors")
    config = {
        "merge_method": "lrp",
        "base_model": "models/base",
        "models": [
            {"model": "models/ft_a", "parameters": {"lrp_scores": "models/a.safetensors"}},
            {"model": "models/ft_b", "parameters": {"lrp_scores": "models/b.safetensors"}},
        ],
        "dtype": "float32",
    }
    result = mergekit_yaml(
        config,
        tmp_path / "out" / "x",
        "--random-seed",
        "0",
        env={"HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model card could not be generated" in result.stderr
    out = tmp_path / "out" / "x"
    assert read_weights(out) and (out / "config.json").is_file()
    card = card_of(out)
    assert "# x" in card and "models/ft_a" in card and "How the weights were chosen" in card
    saved = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert saved["base_model"] == "models/base"
    assert saved["parameters"]["density"] == DEFAULT_DENSITY  # the default, written out

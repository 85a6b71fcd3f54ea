"""What an lrp merge tells its user: the model card, unknown parameters, one-line errors,
constant scores, a disabled or unknown setup."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import synthetic_scores
from helpers import lrp_config
from merging import run
from safetensors.torch import load_file

import mergekit_lrp
from mergekit_lrp.merging.tensor_scores import LRPConfigError
from mergekit_lrp.scores.file import ScoreFileError

BIN = Path(sys.executable).parent
SRC = str(Path(mergekit_lrp.__file__).parent.parent)


def mergekit_yaml(config: dict, out: Path, **env) -> subprocess.CompletedProcess:
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_model_card_names_the_output_the_method_and_the_score_files(family, tmp_path):
    run(lrp_config(family), tmp_path / "my-merge")
    card = (tmp_path / "my-merge" / "README.md").read_text()
    assert card.lstrip().startswith("---") or "# my-merge" in card
    assert "partial" not in card
    assert "Merged with `lrp` (mergekit-lrp)" in card
    assert "ft_a.safetensors" in card and "ft_b.safetensors" in card
    assert "mean_abs_grad" in card


@pytest.mark.parametrize(
    "parameters, fragments",
    [
        ({"lambda": 0.01}, ["unknown parameter 'lambda'", "lrp takes:"]),
        ({"densty": 0.5}, ["did you mean 'density'"]),
        ({"lrp_path": "x.safetensors"}, ["'lrp_path'", "'lrp_scores'"]),
    ],
)
def test_parameters_lrp_does_not_take_are_refused(family, tmp_path, parameters, fragments):
    config = lrp_config(family, **parameters)
    with pytest.raises(LRPConfigError) as error:
        run(config, tmp_path / "out")
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "out").exists()


def test_preflight_errors_are_one_line_through_mergekit_yaml(family, tmp_path):
    config = lrp_config(family, per_model={"ft_a": {"lrp_scores": str(tmp_path / "nope.st")}})
    result = mergekit_yaml(config, tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "Error:" in result.stderr and "nope.st" in result.stderr


def test_disabled_plugin_says_why_lrp_is_unknown(family, tmp_path):
    result = mergekit_yaml(lrp_config(family), tmp_path / "out", MERGEKIT_LRP_DISABLE="1")
    assert result.returncode != 0
    assert "disabled by MERGEKIT_LRP_DISABLE" in result.stderr


def test_register_under_python_dash_s_installs_the_checks_too(family, tmp_path):
    """Without site, register() must bring the preflight: a score file of another fine-tune
    is refused, as under mergekit-yaml."""
    config = lrp_config(family, per_model={"ft_a": {"lrp_scores": str(family["ft_b_scores"])}})
    code = (
        "import json, sys; sys.path[:0] = sys.argv[3:]\n"
        "import mergekit_lrp; mergekit_lrp.register()\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "run_merge(MergeConfiguration.model_validate(json.loads(sys.argv[1])), sys.argv[2],"
        " MergeOptions(quiet=True))\n"
    )
    paths = [SRC, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, json.dumps(config), str(tmp_path / "out"), *paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "different checkpoint" in result.stderr, result.stderr[-2000:]


def test_unknown_mergekit_version_merges_and_names_the_fixes_that_are_off(family, tmp_path):
    code = (
        "import importlib.metadata as md, json, sys, warnings\n"
        "real = md.version\n"
        "md.version = lambda name: '0.1.99' if name == 'mergekit' else real(name)\n"
        "warnings.simplefilter('always')\n"
        "from mergekit.config import MergeConfiguration\n"
        "from mergekit.merge import run_merge\n"
        "from mergekit.options import MergeOptions\n"
        "run_merge(MergeConfiguration.model_validate(json.loads(sys.argv[1])), sys.argv[2],"
        " MergeOptions(quiet=True))\n"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(lrp_config(family)), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "config.json").exists()
    for fix in ("deterministic architecture choice", "MTP tensors kept"):
        assert f"planner fix '{fix}' is off for mergekit 0.1.99" in result.stderr


def test_constant_scores_are_refused_unless_missing_scores_says_otherwise(family, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    scores = load_file(family["ft_a_scores"])
    scores[name] = torch.full_like(scores[name], 0.25)
    path = synthetic_scores(family["ft_a"], tmp_path / "flat.safetensors", seed=0, tensors=scores)
    config = lrp_config(family, per_model={"ft_a": {"lrp_scores": str(path)}})
    with pytest.raises(ScoreFileError, match="flat.safetensors.*up_proj.*same for every entry"):
        run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    magnitude = run({**config, "parameters": {**config["parameters"],
                                              "missing_scores": "magnitude"}},
                    tmp_path / "magnitude")  # fmt: skip
    base = load_file(family["base"] / "model.safetensors")[name]
    kept = (magnitude[name] != base).float().mean()
    assert 0.5 <= kept < 1.0  # ft_a's half by |delta| plus ft_b's half by its scores

"""Every bad lrp input fails with a message naming the culprit, leaving no output behind."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from checkpoints import synthetic_scores
from helpers import lrp_config
from merge_runner import mergekit_yaml, run
from safetensors.torch import load_file

from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.scores.file import ScoreFileError


def fails(config, tmp_path, *fragments):
    out = tmp_path / "out"
    with pytest.raises(Exception) as error:
        run(config, out)
    message = str(error.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    return message


def with_scores(family, path):
    return lrp_config(family, per_model={"ft_a": {"lrp_scores": str(path)}})


def test_missing_lrp_scores_is_an_error_not_a_fallback(family, tmp_path):
    config = lrp_config(family)
    del config["models"][0]["parameters"]["lrp_scores"]
    fails(config, tmp_path, family["ft_a"], "no lrp_scores", "missing_scores")


def test_missing_scores_magnitude_is_explicit(family, tmp_path):
    config = lrp_config(family, missing_scores="magnitude")
    del config["models"][0]["parameters"]["lrp_scores"]
    merged = run(config, tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_score_path_that_does_not_exist(family, tmp_path):
    fails(
        with_scores(family, tmp_path / "nope.safetensors"),
        tmp_path,
        "nope.safetensors",
        "does not exist",
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "model_file"])
def test_file_that_is_not_a_score_file(family, tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    if damage == "garbage":
        path.write_bytes(b"this is not safetensors at all" * 10)
    elif damage == "truncated":
        data = family["ft_a_scores"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        shutil.copy(family["ft_a"] / "model.safetensors", path)
    fails(with_scores(family, path), tmp_path, "bad.safetensors")


def test_score_file_of_another_finetune(family, tmp_path):
    """Same base, same shapes: only the fingerprint tells ft_b's scores from ft_a's."""
    fails(
        with_scores(family, family["ft_b_scores"]),
        tmp_path,
        "ft_b.safetensors",
        family["ft_a"],
        "different checkpoint",
    )


@pytest.mark.parametrize(
    "tensor, value, fragment",
    [
        ("model.layers.0.mlp.up_proj.weight", None, "no scores for tensor"),
        ("model.layers.0.mlp.up_proj.weight", torch.rand(3, 3), "shape"),
        ("model.layers.1.self_attn.q_proj.weight", "nan", "NaN or Inf"),
        ("model.layers.1.self_attn.q_proj.weight", "inf", "NaN or Inf"),
        ("model.extra.weight", torch.rand(4, 4), "does not have"),
    ],
)
def test_bad_score_tensor(family, tmp_path, tensor, value, fragment):
    from safetensors.torch import load_file

    scores = load_file(family["ft_a_scores"])
    if isinstance(value, str):
        scores[tensor][0, 0] = float(value)
    elif value is not None:
        scores[tensor] = value
    path = synthetic_scores(
        family["ft_a"],
        tmp_path / "edited.safetensors",
        seed=0,
        tensors=scores,
        drop=[tensor] if value is None else [],
    )
    fails(with_scores(family, path), tmp_path, "edited.safetensors", tensor, fragment)


@pytest.mark.parametrize(
    "per_model, fragment",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"weight": -0.5}, "weight"),
    ],
)
def test_out_of_range_parameters(family, tmp_path, per_model, fragment):
    config = lrp_config(family, per_model={"ft_b": per_model})
    fails(config, tmp_path, fragment, family["ft_b"], "must")


def test_unknown_option_value(family, tmp_path):
    fails(lrp_config(family, importance="gradient"), tmp_path, "importance", "delta, weight")


def hostile(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("kind", ["huge header", "integer scores"])
def test_hostile_score_files(family, tmp_path, kind):
    from mergekit_lrp.scores.file import ScoreMetadata
    from mergekit_lrp.scores.fingerprint import model_fingerprint

    path = tmp_path / "hostile.safetensors"
    if kind == "huge header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    else:
        meta = ScoreMetadata(
            model_fingerprint=model_fingerprint(family["ft_a"]),
            num_prompts=1,
            num_tokens=1,
            target="predicted",
            model_type="llama",
        ).to_header()
        name = "model.layers.0.mlp.up_proj.weight"
        scores = synthetic_scores(family["ft_a"], tmp_path / "ok.safetensors", seed=0)
        from safetensors.torch import load_file, save_file

        tensors = load_file(scores)
        tensors[name] = torch.ones(tensors[name].shape, dtype=torch.int32)
        save_file(tensors, str(path), metadata=meta)
    config = lrp_config(family, per_model={"ft_a": {"lrp_scores": str(path)}})
    out = tmp_path / "out"
    with pytest.raises(Exception, match="hostile.safetensors"):
        run(config, out)
    assert not out.exists()


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


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"dtype": "bf16"}, "dtype: 'bf16' is not a dtype mergekit knows"),
        ({"base_model": None}, "lrp needs base_model"),
    ],
)
def test_setup_mistakes_are_refused_before_merging(family, tmp_path, edit, fragment):
    config = {**lrp_config(family), **edit}
    config = {key: value for key, value in config.items() if value is not None}
    fails(config, tmp_path, fragment)


def test_cuda_without_a_cuda_device_is_one_line(family, tmp_path, monkeypatch):
    import torch as torch_module

    monkeypatch.setattr(torch_module.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    with pytest.raises(LRPConfigError, match="--cuda was given, but torch sees no CUDA device"):
        run(lrp_config(family), out, device="cuda")
    assert not out.exists()


def test_model_folder_without_config_is_one_line_under_mergekit_yaml(family, tmp_path):
    """mergekit's loader would end in a long transformers traceback; the check names the
    missing file before anything is loaded."""
    broken = tmp_path / "ft_a-no-config"
    shutil.copytree(family["ft_a"], broken)
    (broken / "config.json").unlink()
    config = lrp_config(family)
    config["models"][0]["model"] = str(broken)
    out = tmp_path / "out"
    result = mergekit_yaml(config, out)
    assert result.returncode != 0
    assert f"{broken / 'config.json'} does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()

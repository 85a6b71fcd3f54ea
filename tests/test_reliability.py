"""Bad input and hostile files beyond the basic cases: each fails clearly, writes nothing."""

import json
import struct
from pathlib import Path

import pytest
import torch
from checkpoints import char_tokenizer, synthetic_scores, tiny_llama
from helpers import invoke, lrp_config
from merging import read_weights, run

from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("p") / "prompts.txt"
    path.write_text("short one\n" + "a very long prompt " * 20 + "\nanother\n")
    return path


def test_prompt_longer_than_max_length_keeps_its_end(family, prompts, tmp_path):
    out = tmp_path / "s.safetensors"
    summary = compute_scores(
        str(family["ft_a"]), str(prompts), str(out), ComputeOptions(max_length=32, progress=False)
    )
    assert summary.truncated == 1
    assert summary.tokens <= 32 + len("short one") + len("another") + 4


def test_resume_with_another_model_is_refused(family, prompts, tmp_path, monkeypatch):
    from mergekit_lrp.scoring import loop as compute_module

    out = tmp_path / "s.safetensors"
    real = compute_module.relevance_pass

    def stop_after_two(*args, _calls=[], **kwargs):  # noqa: B006 - call counter
        _calls.append(1)
        if len(_calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compute_module, "relevance_pass", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        compute_scores(
            str(family["ft_a"]),
            str(prompts),
            str(out),
            ComputeOptions(checkpoint_every=1, progress=False),
        )
    monkeypatch.undo()
    with pytest.raises(ValueError, match="model_fingerprint"):
        compute_scores(
            str(family["ft_b"]),
            str(prompts),
            str(out),
            ComputeOptions(checkpoint_every=1, resume=True, progress=False),
        )
    assert not out.exists()


def test_unwritable_output_location(family, prompts, tmp_path, monkeypatch):
    """/proc is read-only even for root, unlike a chmod-ed directory; found before scoring."""
    from mergekit_lrp.scoring import loop as compute_module

    monkeypatch.setattr(compute_module, "relevance_pass", None)  # scoring must not start
    result = invoke(family["ft_a"], "--prompts", prompts, "-o", "/proc/scores.safetensors")
    assert result.exit_code != 0 and "cannot write to /proc" in result.output, result.output
    monkeypatch.undo()
    with pytest.raises(OSError):
        run(lrp_config(family), Path("/proc/merged"))


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


def test_pickled_checkpoint_is_refused_before_unpickling(tmp_path, prompts, monkeypatch):
    model = tiny_llama(seed=0)
    model_dir = tmp_path / "bin-model"
    model.config.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")  # a pickled checkpoint

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    result = invoke(model_dir, "--prompts", prompts, "-o", tmp_path / "s.safetensors")
    assert result.exit_code != 0 and "never unpickles" in result.output, result.output


def test_lrp_merges_are_byte_identical(family, tmp_path):
    first = run(lrp_config(family), tmp_path / "one")
    second = run(lrp_config(family), tmp_path / "two")
    assert all(torch.equal(first[n], second[n]) for n in first)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_existing_output_directory_keeps_unrelated_files(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    merged = run(lrp_config(family), out)
    assert (out / "notes.txt").read_text() == "mine" and merged
    assert read_weights(out).keys() == merged.keys()


@pytest.mark.parametrize("option", [("--max-length", "1"), ("--num-prompts", "0")])
def test_out_of_range_cli_options(family, prompts, tmp_path, option):
    result = invoke(family["ft_a"], "--prompts", prompts, "-o", tmp_path / "s.safetensors", *option)
    assert result.exit_code == 2 and option[0] in result.output
    assert not (tmp_path / "s.safetensors").exists()

"""lrp-compute's command line refuses bad inputs with a clear message and writes nothing."""

from pathlib import Path

import pytest
import torch
from checkpoints import PROMPTS, char_tokenizer, save
from helpers import invoke, lrp_config
from merge_runner import run
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring import loop as compute_module


def test_cli_bad_inputs_fail_clearly_without_output(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "out.safetensors"
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    gpt2_dir = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    save(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=104)), gpt2_dir)
    cases = [
        ((tmp_path / "no-model", "--prompts", prompts_file, "-o", out), "no-model"),
        ((llama_dir, "--prompts", blank, "-o", out), "blank.txt"),
        ((llama_dir, "--prompts", empty, "-o", out), "empty.txt"),
        ((llama_dir, "--prompts", tmp_path / "nope.txt", "-o", out), "nope.txt"),
        ((gpt2_dir, "--prompts", prompts_file, "-o", out), "'gpt2'"),
        (
            (llama_dir, "--prompts", prompts_file, "-o", blank / "x.safetensors"),
            str(blank),
        ),
    ]
    for args, culprit in cases:
        result = invoke(*args)
        assert result.exit_code != 0
        assert culprit in result.output, result.output
        assert "Traceback" not in result.output
        assert not out.exists()


def test_cli_refuses_to_overwrite(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    result = invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q")
    assert result.exit_code != 0 and "--overwrite" in result.output
    assert out.read_bytes() == b"keep me"
    assert (
        invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q", "--overwrite").exit_code == 0
    )
    assert ScoreReader(out).metadata.num_prompts == len(PROMPTS)


def test_output_that_is_a_folder_is_refused_before_loading(
    llama_dir, prompts_file, tmp_path, monkeypatch
):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    folder = tmp_path / "scores"
    folder.mkdir()
    result = invoke(llama_dir, "--prompts", prompts_file, "-o", folder, "-q", "--overwrite")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{folder} is a folder" in result.output, result.output
    assert list(folder.iterdir()) == []


def test_score_file_gets_ordinary_permissions(llama_dir, prompts_file, tmp_path):
    import os
    import stat

    out = tmp_path / "s.safetensors"
    assert invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q").exit_code == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("option", [("--max-length", "1"), ("--num-prompts", "0")])
def test_out_of_range_cli_options(family, long_prompts_file, tmp_path, option):
    out = tmp_path / "s.safetensors"
    result = invoke(family["ft_a"], "--prompts", long_prompts_file, "-o", out, *option)
    assert result.exit_code == 2 and option[0] in result.output
    assert not (tmp_path / "s.safetensors").exists()


def test_pickled_checkpoint_is_refused_before_unpickling(tmp_path, long_prompts_file, monkeypatch):
    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT)
    model_dir = tmp_path / "bin-model"
    model.config.save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")  # a pickled checkpoint

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    result = invoke(model_dir, "--prompts", long_prompts_file, "-o", tmp_path / "s.safetensors")
    assert result.exit_code != 0 and "never unpickles" in result.output, result.output


def test_unwritable_output_location(family, long_prompts_file, tmp_path, monkeypatch):
    """/proc is read-only even for root, unlike a chmod-ed directory; found before scoring."""

    monkeypatch.setattr(compute_module, "relevance_pass", None)  # scoring must not start
    out = "/proc/scores.safetensors"
    result = invoke(family["ft_a"], "--prompts", long_prompts_file, "-o", out)
    assert result.exit_code != 0 and "cannot write to /proc" in result.output, result.output
    monkeypatch.undo()
    with pytest.raises(OSError):
        run(lrp_config(family), Path("/proc/merged"))


def test_max_length_above_the_models_positions_is_refused_and_the_default_capped(
    llama_dir, prompts_file, tmp_path
):
    """The tests' checkpoints have 128 positions: 512 by default would score positions
    the model never saw."""
    out = tmp_path / "s.safetensors"
    refused = invoke(llama_dir, "--prompts", prompts_file, "-o", out, "--max-length", "200")
    assert refused.exit_code != 0 and "--max-length 200 exceeds the 128 positions" in refused.output
    assert not out.exists()
    assert invoke(llama_dir, "--prompts", prompts_file, "-o", out, "-q").exit_code == 0
    assert ScoreReader(out).metadata.extra["max_length"] == "128"


def test_a_folder_without_config_json_says_what_it_lacks(prompts_file, tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    result = invoke(folder, "--prompts", prompts_file, "-o", tmp_path / "s.safetensors")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "has no config.json: it is not a transformers checkpoint" in result.output
    assert "nor a PEFT adapter" in result.output


def test_what_lrp_compute_prints_follows_the_signal(llama_dir, prompts_file, tmp_path):
    """A forward-only signal: no checkpointing choice, no conservation, no missing_scores
    hint for the 1-D tensors it does not measure, a 'forward' progress bar; the
    checkpointing choice of a backward signal is printed once."""
    activation = invoke(
        llama_dir, "--prompts", prompts_file, "-o", tmp_path / "a.safetensors",
        "--method", "activation",
    )  # fmt: skip
    assert activation.exit_code == 0, activation.output
    assert "gradient-checkpointing" not in activation.output
    assert "missing_scores" not in activation.output and "conservation" not in activation.output
    assert "forward:" in activation.output and "relevance:" not in activation.output
    attnlrp = invoke(llama_dir, "--prompts", prompts_file, "-o", tmp_path / "b.safetensors")
    assert attnlrp.output.count("gradient-checkpointing auto:") == 1
    assert "share of the target's relevance that reached the input" in attnlrp.output


def test_threads_leave_cores_that_other_processes_keep_busy(
    llama_dir, prompts_file, tmp_path, monkeypatch
):
    import os

    from mergekit_lrp.scoring.placement import decide_threads

    assert decide_threads(3)[0] == 3  # --threads wins
    assert decide_threads(None, load=2.0, cores=2)[0] == 1
    assert decide_threads(None, load=0.0, cores=64)[0] == torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on two cores
    try:
        result = invoke(llama_dir, "--prompts", prompts_file, "-o", tmp_path / "s.safetensors")
        assert torch.get_num_threads() == 2  # restored for the caller
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    assert "threads auto: 1 (other processes keep about 1.9 of 2 cores busy" in result.output

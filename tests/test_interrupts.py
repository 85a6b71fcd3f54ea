"""Killed or interrupted runs leave nothing that looks complete, and resume exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from checkpoints import finetune_of, save, synthetic_scores
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def scoring_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    model = save(make_tiny_model("llama", seed=2, **AS_CHECKPOINT), root / "model")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}: " + "abc def " * 12 for i in range(40)) + "\n")
    reference = root / "reference.safetensors"  # in this process: the same code as the CLI
    options = ComputeOptions(progress=False, checkpoint_every=3)
    compute_scores(str(model), str(prompts), str(reference), options)
    return model, prompts, reference


def default_sigint() -> None:
    """In the child, before exec: SIGINT delivered and handled by Python's default. A
    blocked or ignored SIGINT is inherited across exec, and the test runner's process
    may have one (seen under pytest-xdist in the full suite: the run then ignored the
    signal and finished)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(model, prompts, out, *extra):
    return subprocess.Popen(
        [
            str(BIN / "lrp-compute"),
            str(model),
            "--prompts",
            str(prompts),
            "-o",
            str(out),
            "-q",
            "--checkpoint-every",
            "3",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )


def wait_for(predicate, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("kill_point", ["before any checkpoint", "after a checkpoint"])
def test_sigkill_then_resume_gives_the_uninterrupted_file(scoring_job, tmp_path, kill_point):
    model, prompts, reference = scoring_job
    out = tmp_path / "scores.safetensors"
    resume = tmp_path / "scores.safetensors.resume"
    process = start(model, prompts, out)
    if kill_point == "after a checkpoint":
        wait_for(resume.exists, process)
    else:
        time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".safetensors"]
    assert resume.exists() == (kill_point == "after a checkpoint")
    finished = start(model, prompts, out, "--resume")
    assert finished.wait(timeout=600) == 0, finished.stderr.read()
    assert out.read_bytes() == reference.read_bytes()
    assert not resume.exists()


def test_ctrl_c_ends_with_one_clear_line(scoring_job, tmp_path):
    model, _, _ = scoring_job
    prompts = tmp_path / "prompts.txt"  # long enough that the run is still going when
    prompts.write_text("".join(f"prompt {i}: abc def\n" for i in range(5000)))  # signalled
    out = tmp_path / "scores.safetensors"
    process = start(model, prompts, out)
    wait_for((tmp_path / "scores.safetensors.resume").exists, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    masks = [line for line in Path("/proc/self/status").read_text().splitlines()
             if line.startswith(("SigBlk", "SigIgn"))]  # fmt: skip
    assert process.returncode != 0, masks
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: interrupted") and "--resume" in lines[-1], stderr
    assert not out.exists()


def test_killed_lrp_merge_leaves_no_complete_looking_output(tmp_path):
    big_vocabulary = {**AS_CHECKPOINT, "vocab_size": 30000}
    base = save(make_tiny_model("llama", seed=0, **big_vocabulary), tmp_path / "base")
    ft = finetune_of(base, tmp_path / "ft", seed=1)
    scores = synthetic_scores(ft, tmp_path / "ft.safetensors", seed=3)
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "lrp",
                "base_model": str(base),
                "dtype": "float32",
                "models": [{"model": str(ft), "parameters": {"lrp_scores": str(scores)}}],
            }
        )
    )
    out = tmp_path / "merged"
    process = subprocess.Popen(
        [str(BIN / "mergekit-yaml"), str(config), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: any(p.name.startswith(".merged.partial") for p in tmp_path.iterdir()), process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists()

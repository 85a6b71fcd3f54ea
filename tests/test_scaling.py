"""lrp-compute past one process: torch.distributed over CPU processes, and device maps."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import char_tokenizer, save
from safetensors import safe_open
from tiny_models import AS_CHECKPOINT, make_tiny_model

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring.loop import relevance_scores
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

# five prompts of different lengths: the two processes get unequal shares (3 and 2)
PROMPTS = ["12+34=46", "reverse: abc -> cba", "the cat sat on the mat", "key k7 -> v3", "zz"]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scaling")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return save(make_tiny_model("llama", seed=11, **AS_CHECKPOINT), root / "model"), prompts


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={processes}", "--no-python", str(BIN / "lrp-compute"), *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_two_cpu_processes_match_one(inputs, tmp_path):
    model, prompts = inputs
    single = tmp_path / "single.safetensors"
    # float32 files: the two sums differ by float rounding, which bfloat16 could amplify
    options = ComputeOptions(progress=False, score_dtype="float32")
    compute_scores(str(model), str(prompts), str(single), options)
    shared = tmp_path / "shared.safetensors"
    result = torchrun(2, str(model), "--prompts", str(prompts), "--output", str(shared),
                      "--score-dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("wrote ") == 1  # the first process reports, once
    assert "shared by 2 processes" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shared.safetensors",
        "single.safetensors",
    ]
    one, two = ScoreReader(single).metadata, ScoreReader(shared).metadata
    assert (two.num_prompts, two.num_tokens) == (one.num_prompts, one.num_tokens)
    assert two.model_fingerprint == one.model_fingerprint
    expected, got = tensors(single), tensors(shared)
    assert got.keys() == expected.keys()
    for name in expected:
        assert expected[name].sum() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-9)


def test_each_process_scores_a_different_share(inputs, tmp_path):
    """Guards against every process scoring every prompt (sums would double)."""
    model, prompts = inputs
    first = tmp_path / "first.safetensors"
    options = ComputeOptions(progress=False, num_prompts=1, score_dtype="float32")
    compute_scores(str(model), str(prompts), str(first), options)
    result = torchrun(2, str(model), "--prompts", str(prompts), "--output",
                      str(tmp_path / "two.safetensors"), "--num-prompts", "1",
                      "--score-dtype", "float32")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # one prompt over two processes: the second has none, the mean is unchanged
    for name, value in tensors(first).items():
        torch.testing.assert_close(tensors(tmp_path / "two.safetensors")[name], value)


def test_device_map_cannot_combine_with_several_processes(inputs, tmp_path, monkeypatch):
    model, prompts = inputs
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "scores.safetensors"
    with pytest.raises(ComputeError, match="--device-map"):
        compute_scores(str(model), str(prompts), str(out),
                       ComputeOptions(progress=False, device_map="auto"))  # fmt: skip
    assert not out.exists()


def test_device_map_auto_gives_the_same_file(inputs, tmp_path):
    model, prompts = inputs
    plain, mapped = tmp_path / "plain.safetensors", tmp_path / "mapped.safetensors"
    compute_scores(str(model), str(prompts), str(plain), ComputeOptions(progress=False))
    options = ComputeOptions(progress=False, device_map="auto")
    compute_scores(str(model), str(prompts), str(mapped), options)
    assert plain.read_bytes() == mapped.read_bytes()


def test_layers_split_by_a_device_map_keep_their_dispatch_hooks(inputs):
    """A device map that splits the layers puts accelerate hooks on each part; the rules
    must wrap the hooked forward, not replace it, and leave the hooks in place."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    model, _ = inputs
    plain = AutoModelForCausalLM.from_pretrained(model)
    split = AutoModelForCausalLM.from_pretrained(model)
    parts = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm",
             "model.rotary_emb", "lm_head"]  # fmt: skip
    dispatch_model(split, device_map=dict.fromkeys(parts, "cpu"), force_hooks=True)
    hooked = [m for m in split.modules() if hasattr(m, "_hf_hook")]
    assert len(hooked) >= len(parts)
    calls = []
    hook = split.model.norm._hf_hook  # a module whose forward the rules replace
    original = hook.pre_forward
    hook.pre_forward = lambda module, *a, **k: calls.append(1) or original(module, *a, **k)

    tokenizer = char_tokenizer()
    expected = relevance_scores(plain, tokenizer, PROMPTS)
    got = relevance_scores(split, tokenizer, PROMPTS)
    assert calls, "the final norm's dispatch hook was bypassed under the rules"
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-9)
    assert all(hasattr(m, "_hf_hook") for m in hooked)
    ids = torch.tensor([[5, 9, 14]])
    torch.testing.assert_close(split(ids).logits, plain(ids).logits)


def test_killed_two_process_run_resumes_to_the_uninterrupted_file(inputs, tmp_path):
    model, _ = inputs
    prompts = tmp_path / "many.txt"
    prompts.write_text("\n".join(f"prompt {i}: " + "abc def " * 12 for i in range(80)) + "\n")
    args = ["--prompts", str(prompts), "-q", "--checkpoint-every", "3"]
    reference = tmp_path / "reference.safetensors"
    done = torchrun(2, str(model), "--output", str(reference), *args)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "scores.safetensors"
    ranks = [tmp_path / f"scores.safetensors.resume.rank{r}-of-2" for r in (0, 1)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--no-python", str(BIN / "lrp-compute"), str(model), "--output", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(command, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ranks):
        assert run.poll() is None, "the run ended before both processes checkpointed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # torchrun starts its workers in sessions of their own: kill them, then torchrun
    workers = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
    for pid in [*map(int, workers), run.pid]:
        os.kill(pid, signal.SIGKILL)
    run.wait()
    assert not out.exists() and all(r.exists() for r in ranks)

    # another process layout is refused instead of silently starting over
    with pytest.raises(ComputeError, match="another number of processes"):
        compute_scores(str(model), str(prompts), str(out),
                       ComputeOptions(progress=False, resume=True))  # fmt: skip
    resumed = torchrun(2, str(model), "--output", str(out), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()
    assert not any(r.exists() for r in ranks)

"""Fixtures shared by the test modules (helpers they import live in ordinary modules)."""

import os
from pathlib import Path

import pytest
import torch
from checkpoints import (
    PROMPTS,
    VOCAB,
    char_tokenizer,
    finetune_of,
    mtp_tensors,
    perturbed,
    save,
    synthetic_scores,
    write_checkpoint,
)
from safetensors.torch import load_file
from tiny_models import (
    AS_CHECKPOINT,
    make_tiny_hybrid,
    make_tiny_model,
    make_tiny_qwen3_5_multimodal,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes (scripts/test.sh runs two, one a core): one thread
    # each, and for the processes the tests start, or they would all contend for the cores
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, two stand-in fine-tunes and a valid synthetic score file for each."""
    root = tmp_path_factory.mktemp("family")
    base = save(make_tiny_model("llama", seed=0, **AS_CHECKPOINT), root / "base")
    paths = {"base": base}
    for index, name in enumerate(("ft_a", "ft_b"), start=1):
        paths[name] = finetune_of(base, root / name, seed=index)
        paths[f"{name}_scores"] = synthetic_scores(
            paths[name], root / f"{name}.safetensors", seed=10 + index
        )
    return paths


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama checkpoint to score."""
    model = make_tiny_model("llama", seed=3, **AS_CHECKPOINT)
    return save(model, tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def prompts_file(request, tmp_path_factory) -> Path:
    """The requesting test module's ``PROMPTS`` (default: ``checkpoints.PROMPTS``), one a line."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(getattr(request.module, "PROMPTS", PROMPTS)) + "\n")
    return path


@pytest.fixture(scope="module")
def long_prompts_file(tmp_path_factory) -> Path:
    """Three prompts, the second longer than 32 tokens."""
    path = tmp_path_factory.mktemp("p") / "prompts.txt"
    path.write_text("short one\n" + "a very long prompt " * 20 + "\nanother\n")
    return path


@pytest.fixture(scope="module")
def qwen3_5_family(tmp_path_factory) -> dict[str, Path]:
    """A Qwen3.5-layout base (hybrid layers, vision tower, MTP) and two fine-tunes;
    ``ft_b`` dropped the MTP module, as some published fine-tunes do."""
    root = tmp_path_factory.mktemp("qwen3_5")
    model = make_tiny_qwen3_5_multimodal(vocab_size=VOCAB)
    model.save_pretrained(root / "saved")
    char_tokenizer().save_pretrained(root / "saved")
    state = load_file(root / "saved" / "model.safetensors")
    state.update(mtp_tensors(state, seed=5))
    paths = {"root": root, "base": write_checkpoint(root / "base", root / "saved", state)}
    paths["ft_a"] = write_checkpoint(root / "ft_a", root / "saved", perturbed(state, 1))
    no_mtp = perturbed(state, 2, keep=lambda name: not name.startswith("mtp."))
    paths["ft_b"] = write_checkpoint(root / "ft_b", root / "saved", no_mtp)
    return paths


@pytest.fixture(scope="module")
def qwen3_next_family(tmp_path_factory) -> dict[str, Path]:
    """A Qwen3-Next base with MoE in layers 0, 1, 3 (layer 2 dense) and one fine-tune."""
    root = tmp_path_factory.mktemp("qwen3_next")
    model = make_tiny_hybrid("qwen3_next", vocab_size=VOCAB)
    model.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    state = load_file(root / "base" / "model.safetensors")
    return {
        "root": root,
        "base": root / "base",
        "ft": write_checkpoint(root / "ft", root / "base", perturbed(state, 3)),
    }

"""Fused MoE expert tensors are checked before the merge by the code that reads them."""

from pathlib import Path

import pytest
import torch
from checkpoints import char_tokenizer, synthetic_scores
from merge_runner import run
from tiny_models import make_tiny_hybrid

from mergekit_lrp.scores.file import ScoreFileError

EXPERT = "model.layers.0.mlp.experts.1.up_proj.weight"  # stored per expert


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def score_file(model_dir: Path, out: Path, **edits) -> Path:
    """Random per-expert scores named as the checkpoint stores them (``edits``: see
    ``synthetic_scores``)."""
    return synthetic_scores(model_dir, out, seed=0, model_type="qwen3_next", **edits)


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    vocab = len(char_tokenizer())
    base = save(make_tiny_hybrid("qwen3_next", vocab_size=vocab), root / "base")
    model = make_tiny_hybrid("qwen3_next", vocab_size=vocab)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return root, base, save(model, root / "ft")


def config(base, ft, scores) -> dict:
    return {
        "merge_method": "lrp",
        "base_model": str(base),
        "parameters": {"density": 0.5},
        "models": [{"model": str(ft), "parameters": {"lrp_scores": str(scores)}}],
        "dtype": "float32",
    }


def preflight_of(merge_config: dict):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_lrp.merging.preflight import check_merge

    check_merge(MergeConfiguration.model_validate(merge_config), MergeOptions(quiet=True))


def test_fused_experts_merge_from_per_expert_scores(moe_pair, tmp_path):
    root, base, ft = moe_pair
    scores = score_file(ft, tmp_path / "ok.safetensors")
    preflight_of(config(base, ft, scores))
    merged = run(config(base, ft, scores), tmp_path / "out")
    fused = [n for n in merged if "experts" in n and "gate_up" in n]
    assert fused, sorted(merged)[:10]


@pytest.mark.parametrize(
    "edits, fragment",
    [
        ({"tensors": {EXPERT: torch.rand(3, 3)}}, "shape"),
        ({"drop": [EXPERT]}, "no scores for tensor"),
    ],
)
def test_bad_expert_scores_are_refused_before_the_merge(moe_pair, tmp_path, edits, fragment):
    """Without the shared lookup the preflight skipped fused tensors (they are not stored
    under their own name) and the merge failed midway."""
    root, base, ft = moe_pair
    scores = score_file(ft, tmp_path / "bad.safetensors", **edits)
    with pytest.raises(ScoreFileError, match=fragment) as error:
        preflight_of(config(base, ft, scores))
    assert "experts" in str(error.value)

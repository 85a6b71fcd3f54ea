"""The lrp kernel computes what is specified, checked against hand computation."""

from pathlib import Path

import pytest
import torch
from helpers import TOPK_RULE
from mergekit.merge_methods.api import merge_state_dicts

from mergekit_lrp.merging.selection import top_k_mask
from mergekit_lrp.scores.file import ScoreMetadata, write_scores


def scores_file(path: Path, **tensors) -> str:
    meta = ScoreMetadata(
        model_fingerprint="x", num_prompts=1, num_tokens=1, target="predicted", model_type="llama"
    )
    write_scores(path, tensors, meta)
    return str(path)


def manual_top_k(importance: torch.Tensor, k: int) -> torch.Tensor:
    order = sorted(range(importance.numel()), key=lambda i: (-float(importance.view(-1)[i]), i))
    mask = torch.zeros(importance.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(importance.shape)


@pytest.fixture
def small(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    deltas = [torch.randn(3, 4), torch.randn(3, 4)]
    # scores that invert the magnitude order, so relevance and magnitude disagree
    scores = [1.0 / (d.abs() + 0.1) ** 2 for d in deltas]
    paths = [scores_file(tmp_path / f"s{i}.safetensors", w=s) for i, s in enumerate(scores)]
    models = {"base": {"w": base}, "a": {"w": base + deltas[0]}, "b": {"w": base + deltas[1]}}
    return base, deltas, scores, paths, models


@pytest.mark.parametrize("importance", ["delta", "weight"])
def test_matches_hand_computation(small, importance):
    base, deltas, scores, paths, models = small
    weights = [0.7, 0.4]
    merged = merge_state_dicts(
        models,
        "lrp",
        base="base",
        parameters={
            "lrp_scores": {"a": paths[0], "b": paths[1]},
            **TOPK_RULE,
            "density": 0.5,
            "weight": {"a": weights[0], "b": weights[1]},
            "importance": importance,
        },
    )["w"]
    expected = base.clone()
    for w, d, s in zip(weights, deltas, scores, strict=True):
        source = d if importance == "delta" else base + d
        mask = manual_top_k(source.abs() * s, k=6)  # round(0.5 * 12)
        expected += w * d * mask
        assert not torch.equal(mask, manual_top_k(d.abs(), k=6)), "test needs disagreement"
    torch.testing.assert_close(merged, expected)


def test_rescale_and_consensus(small):
    base, deltas, scores, paths, models = small
    merged = merge_state_dicts(
        models,
        "lrp",
        base="base",
        parameters={
            "lrp_scores": {"a": paths[0], "b": paths[1]},
            **TOPK_RULE,
            "importance": "delta",
            "density": 0.25,
            "rescale": True,
            "consensus": "sum",
            "normalize": True,
        },
    )["w"]
    kept = torch.stack(
        [d * manual_top_k(d.abs() * s, k=3) / 0.25 for d, s in zip(deltas, scores, strict=True)]
    )
    majority = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (kept.sign() == majority).float()
    divisor = agree.sum(0)
    divisor[divisor == 0] = 1
    torch.testing.assert_close(merged, base + (kept * agree).sum(0) / divisor)


def test_top_k_is_exact_and_deterministic_on_ties():
    flat = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.5, 3.0])
    assert top_k_mask(flat, 3).tolist() == [False, True, True, True, False, False]
    values = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    for k in (0, 1, 137, 999, 1000):
        mask = top_k_mask(values, k)
        assert int(mask.sum()) == k
        if 0 < k:
            assert torch.equal(
                mask.nonzero().squeeze(1).sort().values, torch.topk(values, k).indices.sort().values
            )


def test_protected_tensors_keep_full_delta(small, tmp_path):
    _, _, _, _, _ = small
    base = torch.randn(8)
    delta = torch.randn(8)
    path = scores_file(tmp_path / "n.safetensors", **{"model.norm.weight": torch.rand(8)})
    models = {"base": {"model.norm.weight": base}, "a": {"model.norm.weight": base + delta}}
    params = {"lrp_scores": path, "density": 0.25}
    protected = merge_state_dicts(models, "lrp", base="base", parameters=params)
    torch.testing.assert_close(protected["model.norm.weight"], base + delta)
    unprotected = {**params, "protect_special": False, "selection": "topk"}
    plain = merge_state_dicts(models, "lrp", base="base", parameters=unprotected)
    assert int((plain["model.norm.weight"] != base).sum()) == 2  # the top 0.25 of 8


def test_strided_inputs_are_not_mutated(small):
    """mergekit's conformance check (strided inputs, inputs untouched), with score files."""
    _, _, _, paths, models = small
    strided = {k: {"w": v["w"].T.contiguous().T} for k, v in models.items()}
    assert not strided["a"]["w"].is_contiguous()
    copies = {k: v["w"].clone() for k, v in strided.items()}
    params = {"lrp_scores": {"a": paths[0], "b": paths[1]}, "density": 0.7, "weight": 1.0}
    expected = merge_state_dicts(models, "lrp", base="base", parameters=params)["w"]
    actual = merge_state_dicts(strided, "lrp", base="base", parameters=params)["w"]
    torch.testing.assert_close(actual, expected)
    for key, tensor in strided.items():
        assert torch.equal(tensor["w"], copies[key])

"""lrp keeps the delta entries that relevance picks, not magnitude's, and differs from dare_ties."""

import torch
from helpers import lrp_config
from merge_runner import run
from safetensors.torch import load_file

from mergekit_lrp.merging.selection import top_k_mask
from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

QUIET = {"progress": False}


def test_mask_follows_scores_not_magnitude(family, tmp_path):
    """On a real weight, the kept delta entries are the top-k by |theta|*score at the
    default importance, by |delta|*score with ``importance: delta``; never |delta|'s."""
    name = "model.layers.1.mlp.down_proj.weight"
    base = load_file(family["base"] / "model.safetensors")[name]
    theta = load_file(family["ft_a"] / "model.safetensors")[name]
    delta = theta - base
    scores = load_file(family["ft_a_scores"])[name]
    k = round(0.5 * delta.numel())
    for importance, ranked in (("weight", theta.abs() * scores), ("delta", delta.abs() * scores)):
        config = lrp_config(family, importance=importance, per_model={"ft_b": {"weight": 0.0}})
        merged = run(config, tmp_path / importance)[name]
        kept = (merged - base) != 0
        assert int(kept.sum()) == k
        assert torch.equal(kept, top_k_mask(ranked, k)), importance
        assert not torch.equal(kept, top_k_mask(delta.abs(), k))
    default = run(lrp_config(family, rule={}, per_model={"ft_b": {"weight": 0.0}}),
                  tmp_path / "default")[name]  # fmt: skip
    assert torch.equal((default - base) != 0, top_k_mask(theta.abs() * scores, k))


def test_merge_accepts_computed_scores_and_masks_differ_from_magnitude(
    family, tmp_path, prompts_file
):
    scores = {}
    for name in ("ft_a", "ft_b"):
        scores[name] = tmp_path / f"{name}.safetensors"
        compute_scores(
            str(family[name]), str(prompts_file), str(scores[name]), ComputeOptions(**QUIET)
        )
    config = lrp_config(family, per_model={n: {"lrp_scores": str(p)} for n, p in scores.items()})
    merged = run(config, tmp_path / "merged")
    assert all(torch.isfinite(t).all() for t in merged.values())
    weight = "model.layers.0.self_attn.o_proj.weight"
    base = load_file(family["base"] / "model.safetensors")[weight]
    delta = load_file(family["ft_a"] / "model.safetensors")[weight] - base
    relevance = ScoreReader(scores["ft_a"]).get(weight)
    k = round(0.5 * delta.numel())
    lrp_mask, magnitude = top_k_mask(delta.abs() * relevance, k), top_k_mask(delta.abs(), k)
    overlap = (lrp_mask & magnitude).sum() / k
    assert 0.3 < overlap < 0.98, overlap


def test_lrp_differs_from_dare_ties_and_is_finite(family, tmp_path):
    lrp = run(lrp_config(family), tmp_path / "lrp")
    dare = lrp_config(family)
    dare["merge_method"] = "dare_ties"
    for model in dare["models"]:
        del model["parameters"]["lrp_scores"]
    dare_out = run(dare, tmp_path / "dare", random_seed=0)
    assert lrp.keys() == dare_out.keys()
    assert all(torch.isfinite(t).all() for t in lrp.values())
    changed = [n for n in lrp if not torch.equal(lrp[n], dare_out[n])]
    assert any("mlp" in n for n in changed) and any("self_attn" in n for n in changed)

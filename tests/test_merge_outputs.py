"""lrp merges from computed scores are finite, byte-reproducible and leave unrelated files be."""


import torch
from helpers import lrp_config
from merging import read_weights, run

from mergekit_lrp.scores.file import ScoreReader
from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

QUIET = {"progress": False}


def test_merge_accepts_computed_scores_and_masks_differ_from_magnitude(
    family, tmp_path, prompts_file
):
    from safetensors.torch import load_file

    from mergekit_lrp.merging.selection import top_k_mask

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

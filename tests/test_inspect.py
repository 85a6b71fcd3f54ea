"""lrp-inspect: its numbers against hand computation, its plots, --json, refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_lrp import merge_mask
from mergekit_lrp.inspect import stats
from mergekit_lrp.inspect.cli import main
from mergekit_lrp.merging.masks import MaskSettings
from mergekit_lrp.merging.tensor_names import is_protected, layer_index, layer_of, module_kind
from mergekit_lrp.scores.file import ScoreMetadata, ScoreReader, write_scores
from mergekit_lrp.scores.fingerprint import model_fingerprint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def score_file(path: Path, tensors: dict, fingerprint: str = "0" * 64) -> Path:
    metadata = ScoreMetadata(
        model_fingerprint=fingerprint,
        num_prompts=3,
        num_tokens=30,
        target="predicted",
        model_type="llama",
    )
    write_scores(
        path, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}, metadata
    )
    return path


def checkpoint(path: Path, tensors: dict) -> Path:
    path.mkdir()
    save_file(
        {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()},
        str(path / "model.safetensors"),
    )
    return path


def test_tensor_names_give_layer_and_module_kind():
    assert module_kind("model.layers.0.self_attn.q_proj.weight") == "attention"
    assert module_kind("model.layers.0.self_attn.k_norm.weight") == "norms"
    assert module_kind("model.layers.0.mlp.experts.3.down_proj.weight") == "mlp"
    assert module_kind("model.embed_tokens.weight") == "embeddings"
    assert module_kind("lm_head.weight") == "embeddings"
    assert module_kind("model.norm.weight") == "norms"
    assert module_kind("model.rotary_emb.inv_freq") == "other"
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("model.language_model.layers.3.linear_attn.in_proj_qkvz.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_of("mtp.layers.0.mlp.up_proj.weight") == "mtp.layers.0"
    assert layer_of("model.visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0"


def test_one_definition_of_what_protect_special_keeps_whole():
    """1-D tensors and vocabulary-indexed ones, by mergekit's vocabulary axis or by the
    owning module's name; a vision patch embedding is a weight like any other."""
    assert is_protected("model.layers.0.input_layernorm.weight", 1)
    assert is_protected("model.embed_tokens.weight", 2)
    assert is_protected("lm_head.weight", 2)
    assert is_protected("model.language_model.embed_tokens.weight", 2)
    assert is_protected("output.weight", 2, vocabulary_axis=0)
    assert not is_protected("model.visual.patch_embed.proj.weight", 5)
    assert not is_protected("model.layers.0.mlp.up_proj.weight", 2)


def test_per_kind_and_per_layer_totals_match_hand_computation(tmp_path):
    path = score_file(
        tmp_path / "s.safetensors",
        {
            "model.embed_tokens.weight": torch.ones(2, 3),  # embeddings 6
            "model.layers.0.self_attn.q_proj.weight": torch.full((2, 2), 2.0),  # attention 8
            "model.layers.0.mlp.up_proj.weight": [[1.0, 2.0], [3.0, 4.0]],  # mlp 10
            "model.layers.1.input_layernorm.weight": [0.5, 0.5],  # norms 1
            "model.layers.1.self_attn.k_norm.weight": [1.0],  # norms 1
            "model.rotary_emb.inv_freq": [3.0],  # other 3
        },
    )
    summary = stats.summarize(ScoreReader(path))
    totals = {kind: entry["total"] for kind, entry in summary["kinds"].items()}
    assert totals == {"attention": 8.0, "mlp": 10.0, "embeddings": 6.0, "norms": 2.0, "other": 3.0}
    assert summary["total"] == 29.0
    assert summary["kinds"]["norms"]["tensors"] == 2
    assert summary["kinds"]["mlp"]["share"] == pytest.approx(10 / 29)
    layers = {row["layer"]: row for row in summary["layers"]}
    assert list(layers) == [0, 1, None]
    assert (layers[0]["attention"], layers[0]["mlp"], layers[0]["norms"]) == (8.0, 10.0, 0.0)
    assert layers[1]["norms"] == 2.0
    assert (layers[None]["embeddings"], layers[None]["other"]) == (6.0, 3.0)
    assert (summary["prompts"], summary["tokens"], summary["target"]) == (3, 30, "predicted")
    assert summary["unscored"] is None  # no model given


def test_jaccard_and_spearman_match_hand_computation():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert stats.jaccard(a, b) == pytest.approx(1 / 3)
    assert stats.jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) is None
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, 1, 1, 0)
    assert stats.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == (
        pytest.approx(1 - 6 * 2 / 60)
    )
    # ties share their average rank: ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4)
    assert stats.average_ranks(torch.tensor([5.0, 5.0, 7.0, 9.0])).tolist() == [1.5, 1.5, 3, 4]
    rho = stats.spearman(torch.tensor([1.0, 1, 2, 3]), torch.tensor([1.0, 2, 3, 4]))
    assert rho == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert stats.spearman(torch.ones(4), torch.tensor([1.0, 2, 3, 4])) is None  # constant


def test_comparison_of_two_files_per_layer(tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    first = score_file(tmp_path / "a.safetensors", {name: [[4.0, 3.0], [2.0, 1.0]]})
    second = score_file(tmp_path / "b.safetensors", {name: [[1.0, 3.0], [2.0, 4.0]]})
    result = stats.compare_files([ScoreReader(first), ScoreReader(second)], density=0.5)
    (pair,) = result["pairs"]
    (row,) = pair["layers"]
    # top 2 of 4: {0, 1} against {3, 1} -> 1 shared of 3; ranks (4,3,2,1) vs (1,3,2,4)
    assert row["layer"] == 0
    assert row["jaccard"] == pytest.approx(1 / 3)
    assert row["spearman"] == pytest.approx(1 - 6 * 18 / 60)
    assert pair["overall"] == {"jaccard": pytest.approx(1 / 3), "spearman_mean": row["spearman"]}
    assert result["tensors"] == 1


def test_what_lrp_keeps_matches_hand_computation(tmp_path):
    up, norm = "model.layers.0.mlp.up_proj.weight", "model.layers.0.post_attention_layernorm.weight"
    base = checkpoint(tmp_path / "base", {up: torch.zeros(2, 2), norm: [1.0, 1.0]})
    model = checkpoint(tmp_path / "ft", {up: [[1.0, -2.0], [3.0, 0.5]], norm: [1.5, 1.0]})
    scores = score_file(
        tmp_path / "ft.safetensors",
        {up: [[4.0, 1.0], [0.0, 1.0]], norm: [1.0, 1.0]},
        fingerprint=model_fingerprint(model),
    )
    topk = MaskSettings(density=0.5, selection="topk")
    keep = stats.keep_by_layer(ScoreReader(scores), base, model, topk)
    (row,) = keep["layers"]
    # |delta| = (1, 2, 3, .5), importance |delta|*s = (4, 2, 0, .5): lrp keeps entries 0, 1
    # (|delta| 1 + 2 of 6.5), magnitude keeps 2, 1 (3 + 2 of 6.5); masks share 1 of 3
    assert row["lrp_kept"] == pytest.approx(3 / 6.5)
    assert row["magnitude_kept"] == pytest.approx(5 / 6.5)
    assert row["overlap"] == pytest.approx(1 / 3)
    assert (row["entries"], row["kept"]) == (4, 2)
    assert keep["protected"] == [norm]  # 1-D: protect_special keeps it whole
    weight = MaskSettings(density=0.5, importance="weight", selection="topk")
    weight_mode = stats.keep_by_layer(ScoreReader(scores), base, model, weight)
    assert weight_mode["layers"][0]["lrp_kept"] == pytest.approx(3 / 6.5)  # same top 2 here


def test_what_lrp_keeps_is_the_merge_mask_of_a_stochastic_selection(family):
    """lrp-inspect's table is computed from the mask the merge draws (api.merge_mask is
    checked against a real merge in test_api.py) for that seed and model."""
    reader = ScoreReader(family["ft_b_scores"])
    settings = MaskSettings(density=0.6, importance="delta", selection="stochastic", seed=3)
    keep = stats.keep_by_layer(reader, family["base"], family["ft_b"], settings)
    base = load_file(family["base"] / "model.safetensors")
    theta = load_file(family["ft_b"] / "model.safetensors")
    kept = entries = 0
    mass = kept_mass = 0.0
    for name in reader.names():
        if name in keep["protected"] or not name.startswith("model.layers.1."):
            continue
        mask = merge_mask(
            base[name],
            theta[name],
            reader.get(name),
            0.6,
            "delta",
            selection="stochastic",
            seed=3,
            model=str(family["ft_b"]),
            name=name,
        )
        delta = (theta[name] - base[name]).abs().double()
        kept, entries = kept + int(mask.sum()), entries + mask.numel()
        mass, kept_mass = mass + float(delta.sum()), kept_mass + float(delta[mask].sum())
    (row,) = [r for r in keep["layers"] if r["layer"] == 1]
    assert (row["kept"], row["entries"]) == (kept, entries)
    assert row["lrp_kept"] == pytest.approx(kept_mass / mass)
    assert kept != round(0.6 * entries)  # a draw, not exactly the top-k count
    other_seed = MaskSettings(density=0.6, importance="delta", selection="stochastic", seed=4)
    again = stats.keep_by_layer(reader, family["base"], family["ft_b"], other_seed)
    assert [r["kept"] for r in again["layers"]] != [r["kept"] for r in keep["layers"]]


def test_cli_writes_readable_pngs_and_json(family, tmp_path):
    plots = tmp_path / "plots"
    args = [str(family["ft_a_scores"]), str(family["ft_b_scores"])]
    args += ["--model", str(family["ft_a"]), "--model", str(family["ft_b"])]
    args += ["--base", str(family["base"]), "--density", "0.3", "--plots", str(plots), "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = sorted(Path(p).name for p in report["plots"])
    assert names == [
        "compare.png",
        "ft_a-keep.png",
        "ft_a-relevance.png",
        "ft_b-keep.png",
        "ft_b-relevance.png",
    ]
    for path in report["plots"]:
        data = Path(path).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, path
    first = report["files"][0]
    assert first["model"] == str(family["ft_a"]) and first["unscored"] == []
    assert first["prompts"] == 4 and first["tokens"] == 40
    assert [row["layer"] for row in report["keep"][0]["layers"]] == [0, 1]
    assert report["compare"]["masks_from"] == "the merge (topk, importance: weight)"  # defaults
    for row in report["compare"]["pairs"][0]["layers"]:
        assert 0 <= row["jaccard"] <= 1 and -1 <= row["spearman"] <= 1


def test_cli_table_lists_kinds_and_unscored_tensors(family, tmp_path):
    from checkpoints import synthetic_scores

    partial = synthetic_scores(
        family["ft_a"], tmp_path / "partial.safetensors", seed=3, drop=["model.norm.weight"]
    )
    result = CliRunner().invoke(main, [str(partial), "--model", str(family["ft_a"])])
    assert result.exit_code == 0, result.output
    for word in ("attention", "mlp", "embeddings", "norms", "other", "fingerprint"):
        assert word in result.output
    assert "unscored checkpoint tensors: 1 (model.norm.weight)" in result.output


def test_wrong_pairing_is_refused_in_one_line_naming_both_paths(family):
    args = [str(family["ft_a_scores"]), "--model", str(family["ft_b"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert str(family["ft_a_scores"]) in lines[0] and str(family["ft_b"]) in lines[0]
    assert "Traceback" not in result.output


def test_one_model_per_file_or_none(family):
    args = [str(family["ft_a_scores"]), str(family["ft_b_scores"]), "--model", str(family["ft_a"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "one --model per score file" in result.output


def test_other_errors_keep_their_traceback(family, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stats, "summarize", broken)
    result = CliRunner().invoke(main, [str(family["ft_a_scores"])])
    assert isinstance(result.exception, RuntimeError)


def test_comparison_masks_follow_the_merge_importance_with_models(tmp_path):
    """Equal scores: the score masks agree (ties kept in index order), but the merge's
    masks (|delta| * score) keep the two models' largest, disjoint, changes."""
    up = "model.layers.0.mlp.up_proj.weight"
    base = checkpoint(tmp_path / "base", {up: torch.zeros(2, 2)})
    first = checkpoint(tmp_path / "a", {up: [[1.0, 2.0], [3.0, 4.0]]})
    second = checkpoint(tmp_path / "b", {up: [[4.0, 3.0], [2.0, 1.0]]})
    readers = [
        ScoreReader(score_file(tmp_path / f"{n}.safetensors", {up: torch.ones(2, 2)}))
        for n in ("a", "b")
    ]
    by_scores = stats.compare_files(readers, density=0.5)
    assert by_scores["pairs"][0]["layers"][0]["jaccard"] == 1.0
    assert by_scores["pairs"][0]["layers"][0]["spearman"] is None  # constant scores
    topk = MaskSettings(density=0.5, selection="topk")
    mask_of = stats.merge_masks(readers, base, [first, second], topk)
    by_merge = stats.compare_files(readers, 0.5, mask_of, "the merge")
    assert by_merge["pairs"][0]["layers"][0]["jaccard"] == 0.0  # {2, 3} against {0, 1}


def test_a_model_folder_that_does_not_exist_is_named(family, tmp_path):
    result = CliRunner().invoke(
        main, [str(family["ft_a_scores"]), "--model", str(tmp_path / "no-such-model")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"model directory {tmp_path / 'no-such-model'} does not exist" in result.output


def gram_file(path: Path, grams: dict, gram_of: dict) -> Path:
    """A Gram file (lrp-compute --method gram's format) holding ``grams``."""
    metadata = ScoreMetadata(
        model_fingerprint="0" * 64,
        num_prompts=2,
        num_tokens=20,
        target="inputs",
        model_type="llama",
        method="gram",
        quantity="input_gram",
        gram_of=gram_of,
        extra={"token_weighting": "answer"},
    )
    write_scores(path, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in grams.items()},
                 metadata)  # fmt: skip
    return path


def test_a_gram_file_summary_matches_hand_computation(tmp_path):
    attention = "model.layers.0.self_attn.k_proj.input_gram"
    mlp = "model.layers.0.mlp.down_proj.input_gram"
    head = "lm_head.input_gram"
    grams = {
        attention: [[4.0, -1.0], [-1.0, 4.0]],  # eigenvalues 3 and 5
        mlp: [[2.0, 0.0, 0.0], [0.0, 1e-7, 0.0], [0.0, 0.0, 1.0]],  # condition 2e7
        head: [[1.0, 1.0], [1.0, 1.0]],  # rank 1: singular
    }
    gram_of = {f"model.layers.0.self_attn.{x}_proj.weight": attention for x in "qkv"}
    gram_of |= {"model.layers.0.mlp.down_proj.weight": mlp, "lm_head.weight": head}
    path = gram_file(tmp_path / "gram.safetensors", grams, gram_of)
    summary = stats.summarize_gram(ScoreReader(path))
    assert summary["matrices"] == 3 and summary["weights"] == 5
    assert summary["bytes"] == 4 * (4 + 9 + 4)
    assert summary["token_weighting"] == "answer"
    rows = {row["name"]: row for row in summary["grams"]}
    assert [row["name"] for row in summary["grams"]] == [mlp, attention, head]  # by layer
    assert rows[attention]["trace"] == pytest.approx(8.0)
    assert rows[attention]["condition"] == pytest.approx(5 / 3)
    assert rows[mlp]["condition"] == pytest.approx(2e7, rel=1e-3)
    assert rows[head]["condition"] is None  # smallest eigenvalue 0
    assert {n for n, r in rows.items() if r["ill_conditioned"]} == {mlp, head}
    assert summary["ill_conditioned"] == [mlp, head]
    assert rows[attention]["shared_by"] == sorted(w for w in gram_of if "self_attn" in w)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    assert "tokens weighted  answer" in result.output
    assert "k_proj, q_proj, v_proj" in result.output and "singular" in result.output
    as_json = json.loads(CliRunner().invoke(main, [str(path), "--json"]).output)
    assert as_json["files"][0]["grams"] == summary["grams"]


def test_gram_files_are_summarised_alone(family, tmp_path):
    path = gram_file(tmp_path / "gram.safetensors", {"lm_head.input_gram": [[1.0]]},
                     {"lm_head.weight": "lm_head.input_gram"})  # fmt: skip
    result = CliRunner().invoke(main, [str(path), str(family["ft_a_scores"])])
    assert result.exit_code == 0, result.output
    assert "no comparison: Gram files" in result.output
    result = CliRunner().invoke(
        main, [str(path), "--model", str(family["ft_a"]), "--base", str(family["base"])]
    )
    assert result.exit_code == 1
    assert "holds Gram matrices" in result.output and "without --base" in result.output


def test_cli_takes_every_importance_the_merge_takes_and_has_a_version(family):
    args = [str(family["ft_a_scores"]), str(family["ft_b_scores"])]
    args += ["--model", str(family["ft_a"]), "--model", str(family["ft_b"])]
    args += ["--base", str(family["base"]), "--importance", "scores", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["compare"]["masks_from"] == "the merge (topk, importance: scores)"
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("lrp-inspect (mergekit-lrp) ")

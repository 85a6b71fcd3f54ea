"""Factored Gram files (lrp-compute --gram-form factored): the low-rank-plus-diagonal form
against its stated bound, files lrp-compute writes and merges read, and bad input."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from gram_files import gram_file
from helpers import invoke
from merge_runner import run
from safetensors.torch import load_file, save_file

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader
from mergekit_lrp.scores.gram_forms import factor_gram, factor_gram_file
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

DOWN = "model.layers.1.mlp.down_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"


def decaying_gram(n=40, seed=0) -> torch.Tensor:
    """A full-rank Gram matrix whose spectrum falls geometrically, as layer inputs' do."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    values = 0.7 ** torch.arange(n, dtype=torch.float32)
    return (q * values) @ q.T


def two_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


def test_a_low_rank_gram_is_stored_exactly_in_its_rank():
    x = torch.randn(6, 30, generator=torch.Generator().manual_seed(1))
    gram = x.T @ x
    form = factor_gram(gram, 1e-3, None)
    assert form.factor.shape == (30, 6)
    torch.testing.assert_close(form.dense(), gram, rtol=1e-5, atol=1e-5)
    assert form.error < 1e-5


def test_the_rank_is_the_fewest_eigenpairs_meeting_the_bound_and_the_bound_holds():
    gram = decaying_gram()
    for tolerance in (1e-1, 1e-2, 1e-3):
        form = factor_gram(gram, tolerance, None)
        rank = form.factor.shape[1]
        values = torch.linalg.eigvalsh(gram.double()).flip(0)
        assert 2 * values[rank] / values[0] <= tolerance < 2 * values[rank - 1] / values[0]
        approx = form.dense()
        assert two_norm(approx - gram) <= form.error * two_norm(gram) * (1 + 1e-4)
        torch.testing.assert_close(approx.diagonal(), gram.diagonal(), rtol=1e-5, atol=1e-6)
        assert float(torch.linalg.eigvalsh(approx.double()).min()) > -1e-6  # PSD
    # the plain truncation, without the diagonal kept, is off on the diagonal
    rough = factor_gram(gram, 1e-1, None)
    plain = rough.factor @ rough.factor.T
    assert (plain.diagonal() - gram.diagonal()).abs().max() > 1e-3


def test_a_rank_cap_is_kept_and_its_cost_recorded():
    gram = decaying_gram()
    form = factor_gram(gram, 1e-6, 5)
    assert form.factor.shape[1] == 5
    values = torch.linalg.eigvalsh(gram.double()).flip(0)
    assert form.error == pytest.approx(float(2 * values[5] / values[0]), rel=1e-5)


def test_a_matrix_the_factors_would_not_shrink_is_left_dense():
    assert factor_gram(torch.eye(20) + 0.01, 1e-3, None) is None  # flat spectrum: rank 20
    assert factor_gram(torch.zeros(5, 5), 1e-3, None) is None


# ------------------------------------------------------------------ files and merges


@pytest.fixture(scope="module")
def dense(family, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dense-grams")
    return {n: gram_file(family[n], root / f"{n}.safetensors") for n in ("ft_a", "ft_b")}


def regmean(family, files) -> dict:
    models = [
        {"model": str(family[n]), "parameters": {"lrp_scores": str(files[n])}}
        for n in ("ft_a", "ft_b")
    ]
    config = {"merge_method": "regmean", "base_model": str(family["base"]), "models": models,
              "dtype": "float32"}  # fmt: skip
    return config


def test_lrp_compute_writes_factored_matrices_that_read_back_within_their_bound(
    llama_dir, prompts_file, tmp_path
):
    whole, factored = tmp_path / "whole.safetensors", tmp_path / "factored.safetensors"
    compute_scores(str(llama_dir), str(prompts_file), str(whole),
                   ComputeOptions(method="gram", progress=False))  # fmt: skip
    options = ComputeOptions(method="gram", gram_form="factored", gram_max_rank=6, progress=False)
    summary = compute_scores(str(llama_dir), str(prompts_file), str(factored), options)
    exact, compact = ScoreReader(whole), ScoreReader(factored)
    assert compact.metadata.gram_of == exact.metadata.gram_of
    forms = compact.metadata.gram_factored
    assert forms and all(form["rank"] <= 6 for form in forms.values())
    assert summary.factored_ranks and max(summary.factored_ranks) <= 6
    assert any("factored:" in line for line in summary.lines())
    assert factored.stat().st_size < whole.stat().st_size
    for weight in exact.metadata.gram_of:
        g, g_approx = exact.gram(weight), compact.gram(weight)
        assert compact.shape(compact.gram_name(weight)) == tuple(g.shape)
        bound = compact.gram_error(weight) * two_norm(g)
        assert two_norm(g_approx - g) <= bound * (1 + 1e-3) + 1e-6, weight
        torch.testing.assert_close(g_approx.diagonal(), g.diagonal(), rtol=1e-4, atol=1e-6)


def test_regmean_reads_factored_files_and_matches_the_exact_solve_at_full_rank(
    family, dense, tmp_path
):
    exact = run(regmean(family, dense), tmp_path / "exact")
    # 48 calibration tokens: the 64-wide down_proj input has rank 48, stored exactly
    lossless = {n: tmp_path / f"{n}-lossless.safetensors" for n in dense}
    for name, path in lossless.items():
        forms = factor_gram_file(dense[name], path, tolerance=1e-7)
        assert any(s.startswith("model.layers.1.mlp.down_proj") for s in forms), forms
    merged = run(regmean(family, lossless), tmp_path / "lossless")
    for name in (DOWN, Q):
        torch.testing.assert_close(merged[name], exact[name], rtol=1e-4, atol=1e-5)
    capped = {n: tmp_path / f"{n}-capped.safetensors" for n in dense}
    for name, path in capped.items():
        factor_gram_file(dense[name], path, max_rank=3)
    rough = run(regmean(family, capped), tmp_path / "capped")
    assert not torch.allclose(rough[DOWN], exact[DOWN], atol=1e-5)


# ------------------------------------------------------------------ bad input


def rewrite(path, out, drop=(), metadata=None):
    """A copy of safetensors file ``path`` without tensors ``drop``, metadata updated."""
    tensors = load_file(path)
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))["__metadata__"]
    header.update(metadata or {})
    save_file({k: v for k, v in tensors.items() if k not in drop}, out, metadata=header)
    return out


def test_a_factored_matrix_missing_its_diagonal_or_of_the_wrong_rank_is_named(
    dense, tmp_path
):
    factored = tmp_path / "factored.safetensors"
    forms = factor_gram_file(dense["ft_a"], factored, max_rank=3)
    stored = sorted(forms)[0]
    broken = rewrite(factored, tmp_path / "no-diagonal.safetensors", drop=[f"{stored}.diagonal"])
    with pytest.raises(ScoreFileError) as error:
        ScoreReader(broken)
    message = str(error.value)
    assert str(broken) in message and f"{stored}.diagonal" in message
    assert "lrp-compute --method gram" in message and "\n" not in message
    wrong = dict(forms, **{stored: {"rank": 5, "error": 0.1}})
    mismatched = rewrite(factored, tmp_path / "rank.safetensors",
                         metadata={"gram_factored": json.dumps(wrong)})  # fmt: skip
    with pytest.raises(ScoreFileError, match=r"does not fit together .*factor \(\d+, 3\)"):
        ScoreReader(mismatched)


def test_a_broken_factored_file_stops_a_merge_before_anything_is_written(
    family, dense, tmp_path
):
    factored = tmp_path / "factored.safetensors"
    stored = sorted(factor_gram_file(dense["ft_a"], factored, max_rank=3))[0]
    broken = rewrite(factored, tmp_path / "broken.safetensors", drop=[f"{stored}.factor"])
    with pytest.raises(LrpError, match="lacks its tensor"):
        run(regmean(family, {"ft_a": broken, "ft_b": dense["ft_b"]}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gram_form_options_belong_to_method_gram(llama_dir, prompts_file, tmp_path):
    with pytest.raises(ComputeError, match="--method attnlrp writes none"):
        ComputeOptions(gram_form="factored")
    with pytest.raises(ComputeError, match="add --gram-form factored"):
        ComputeOptions(method="gram", gram_max_rank=8)
    with pytest.raises(ComputeError, match="--gram-tolerance must be above 0 and below 1"):
        ComputeOptions(method="gram", gram_form="factored", gram_tolerance=1.5)
    out = tmp_path / "g.safetensors"
    result = invoke(llama_dir, "--prompts", prompts_file, "-o", out, "--method", "gram",
                    "--gram-tolerance", "0.01")  # fmt: skip
    assert result.exit_code == 1 and "add --gram-form factored" in result.output
    assert not out.exists()


def test_lrp_inspect_summarises_a_factored_file_with_its_ranks(dense, tmp_path):
    from mergekit_lrp.inspect import stats

    factored = tmp_path / "factored.safetensors"
    forms = factor_gram_file(dense["ft_a"], factored, max_rank=3)
    whole, compact = (stats.summarize_gram(ScoreReader(p)) for p in (dense["ft_a"], factored))
    assert compact["bytes"] < whole["bytes"] == dense["ft_a"].stat().st_size - 8 - header_size(
        dense["ft_a"]
    )
    ranks = {row["name"]: row["rank"] for row in compact["grams"]}
    assert forms and all(ranks[name] == form["rank"] for name, form in forms.items())
    assert [row["name"] for row in compact["grams"]] == [row["name"] for row in whole["grams"]]
    assert all(row["rank"] is None for row in whole["grams"])


def header_size(path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]

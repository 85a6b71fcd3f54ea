"""Factored Gram files (lrp-compute --gram-form factored): the low-rank-plus-diagonal form
against its stated bound, files lrp-compute writes and merges read, and bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gram_files import gram_file
from helpers import invoke
from merge_runner import run
from safetensors.torch import load_file, save_file

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.gram_solve import GramSolveError, solve
from mergekit_lrp.merging.low_rank_solve import solve_low_rank, uses_low_rank
from mergekit_lrp.scores.file import ScoreFileError, ScoreReader, factor_gram_file
from mergekit_lrp.scores.gram_forms import Factored, combine_factored, factor_gram
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.run import compute_scores

BIN = Path(sys.executable).parent
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
    gram = decaying_gram()  # n = 40: a cap of 6 is above LEADING_SHARE, the whole spectrum
    form = factor_gram(gram, 1e-6, 6)
    assert form.factor.shape[1] == 6 and not form.estimated
    values = torch.linalg.eigvalsh(gram.double()).flip(0)
    assert form.error == pytest.approx(float(2 * values[6] / values[0]), rel=1e-5)


def test_a_cap_far_below_the_width_factors_from_the_leading_eigenpairs_alone():
    """A cap of at most 1/8 of the width: randomized subspace iteration instead of the
    whole spectrum, close to the exact truncation, its measured error not understated by
    more than the power iteration's few per cent, and the same numbers every run."""
    n, cap = 400, 24
    g = torch.Generator().manual_seed(2)
    x = torch.randn(600, n, generator=g) @ torch.diag(torch.logspace(0, -2, n))
    gram = x.T @ x
    form = factor_gram(gram, 1e-6, cap)
    assert form.estimated and form.factor.shape[1] == cap
    top = two_norm(gram)
    actual = two_norm(gram.double() - form.dense().double()) / top
    assert actual <= form.error * 1.05
    exact = torch.linalg.eigvalsh(gram.double()).flip(0)
    truncation = float(exact[cap] / exact[0])  # the best rank-cap error, before the diagonal
    assert actual <= 2.5 * truncation
    torch.testing.assert_close(form.dense().diagonal(), gram.diagonal(), rtol=1e-5, atol=1e-5)
    again = factor_gram(gram, 1e-6, cap)
    assert torch.equal(again.factor, form.factor) and again.error == form.error


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


def test_a_factored_matrix_missing_its_diagonal_or_of_the_wrong_rank_is_named(dense, tmp_path):
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


def test_a_broken_factored_file_stops_a_merge_before_anything_is_written(family, dense, tmp_path):
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
    assert (
        compact["bytes"]
        < whole["bytes"]
        == dense["ft_a"].stat().st_size - 8 - header_size(dense["ft_a"])
    )
    ranks = {row["name"]: row["rank"] for row in compact["grams"]}
    assert forms and all(ranks[name] == form["rank"] for name, form in forms.items())
    assert [row["name"] for row in compact["grams"]] == [row["name"] for row in whole["grams"]]
    assert all(row["rank"] is None for row in whole["grams"])


def header_size(path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def test_factored_parts_combine_within_their_recorded_bound():
    """Two processes' factored sums combined without an [n, n] matrix: within the bound
    the combination records, which carries each part's residual; a cheaper form than
    gathering the dense sums, and not the same numbers (so the test sees the path)."""
    n = 48
    g = torch.Generator().manual_seed(4)
    mixing = torch.randn(n, n, generator=g) * torch.logspace(0, -4, n)  # decaying spectrum
    sums = []
    for _ in range(2):
        x = torch.randn(30, n, generator=g) @ mixing.T
        sums.append((x.T @ x).double())
    total = sums[0] + sums[1]
    parts = [factor_gram(s.float(), 1e-3 / 4, None) for s in sums]
    assert all(part is not None for part in parts)
    combined = combine_factored(parts, total.diagonal(), 1e-3, None)
    carried = sum(p.error * float(p.factor[:, 0].square().sum()) for p in parts)
    top = two_norm(total)
    assert 0 < carried / top < combined.error <= 1e-3
    assert combined.factor.shape[1] < sum(p.factor.shape[1] for p in parts)
    assert two_norm(total - combined.dense().double()) <= combined.error * top
    assert torch.allclose(combined.dense().double().diagonal(), total.diagonal(), rtol=1e-5)
    # parts capped at rank 3 combined at rank 6 = 3 + 3: nothing of F F^T is dropped, so
    # the whole error is the parts' residuals, and the bound must carry them
    capped = [factor_gram(s.float(), 1e-3, 3) for s in sums]
    whole = combine_factored(capped, total.diagonal(), 1e-3, 6)
    assert whole.factor.shape[1] == 6 and whole.error > 1e-3
    assert two_norm(total - whole.dense().double()) <= whole.error * top


def test_two_processes_gather_factors_and_stay_within_the_recorded_bound(
    llama_dir, prompts_file, tmp_path
):
    """Under torchrun the processes gather their factored sums (not the dense ones):
    the combined matrices keep the bound they record against one process's exact sums,
    and are not one process's factorization of them."""
    subset = tmp_path / "prompts.txt"
    subset.write_text("\n".join(prompts_file.read_text().splitlines()[:2]) + "\n")
    runs = {"dense-1": (1, "dense"), "factored-1": (1, "factored"), "factored-2": (2, "factored")}
    outputs = {}
    for label, (processes, form) in runs.items():
        outputs[label] = tmp_path / f"{label}.safetensors"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={processes}", "--no-python"]  # fmt: skip
        args = [str(llama_dir), "--prompts", str(subset), "-o", str(outputs[label]),
                "--method", "gram", "--gram-form", form, "--threads", "1", "-q",
                *(["--gram-max-rank", "4"] if form == "factored" else [])]  # fmt: skip
        command = [*(launcher if processes > 1 else []), str(BIN / "lrp-compute"), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    exact = ScoreReader(outputs["dense-1"])
    one, two = ScoreReader(outputs["factored-1"]), ScoreReader(outputs["factored-2"])
    assert set(two.metadata.gram_factored) == set(one.metadata.gram_factored) != set()
    differs = 0
    for weight, stored in exact.metadata.gram_of.items():
        if stored not in two.metadata.gram_factored or weight != min(
            w for w, s in exact.metadata.gram_of.items() if s == stored
        ):
            continue
        truth = exact.gram(weight).double()
        approx = two.gram(weight).double()
        assert two.gram_error(weight) > 1e-3  # the cap truncates: the bound has work to do
        assert two_norm(truth - approx) <= (two.gram_error(weight) + 1e-6) * two_norm(truth)
        differs += not torch.equal(approx, one.gram(weight).double())
    assert differs
    assert outputs["factored-2"].stat().st_size < outputs["dense-1"].stat().st_size


# ------------------------------------------------------------------ the low-rank solve


def random_form(n, rank, seed, diagonal=True) -> Factored:
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(n, rank, generator=g) * torch.linspace(2.0, 0.2, rank)
    d = torch.rand(n, generator=g) * 0.05 if diagonal else torch.zeros(n)
    return Factored(factor, d, 0.0)


@pytest.mark.parametrize(("alpha", "ridge", "weights"), [(0.9, 1e-4, (1.0, 1.0, 1.0)),
                                                       (1.0, 1e-3, (0.5, 1.0, 2.0)),
                                                       (0.3, 0.0, (1.0, 1.0, 1.0))])  # fmt: skip
def test_the_woodbury_solve_is_the_dense_solve_of_the_same_matrices(alpha, ridge, weights):
    n, out = 24, 7
    g = torch.Generator().manual_seed(9)
    base = torch.randn(out, n, generator=g)
    thetas = [base + 0.1 * torch.randn(out, n, generator=g) for _ in weights]
    forms = [random_form(n, 3, seed) for seed in range(len(weights))]
    args = (alpha, ridge, torch.float64, "test")
    base, thetas = base.double(), [t.double() for t in thetas]

    def whole(form):  # in float64: the float32 F F^T would differ by its own rounding
        factor = form.factor.double()
        return factor @ factor.T + torch.diag(form.diagonal.double())

    dense = solve(base, thetas, [lambda f=f: whole(f) for f in forms], list(weights), *args)
    low = solve_low_rank(base, thetas, [lambda f=f: f for f in forms], list(weights), *args)
    torch.testing.assert_close(low, dense, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(low, base + sum(t - base for t in thetas) / 3, atol=1e-3)


def test_the_woodbury_solve_refuses_what_cannot_be_solved():
    base = torch.zeros(3, 10)
    thetas = [base + 1.0]
    bare = [lambda: random_form(10, 2, 0, diagonal=False)]
    with pytest.raises(GramSolveError, match="singular: 10 input feature"):
        # alpha 1, ridge 0, no diagonal: the factors alone reach 2 directions of 10
        solve_low_rank(base, thetas, bare, [1.0], 1.0, 0.0, torch.float64, "of 'w' (f)")
    with pytest.raises(GramSolveError, match="too ill-conditioned.*raise ridge"):
        solve_low_rank(base, thetas, bare, [1.0], 1.0, 1e-15, torch.float64, "of 'w' (f)")


def test_the_low_rank_solve_is_chosen_where_it_costs_fewer_operations():
    def ranks(count, rank):
        return [{"rank": rank}] * count

    # two models: up to R = 0.66 n; four: up to R = n (a model's matrix may be dense: None)
    assert uses_low_rank(ranks(2, 1), 100) and uses_low_rank(ranks(2, 33), 100)
    assert not uses_low_rank(ranks(2, 34), 100)
    assert uses_low_rank(ranks(4, 24), 100) and not uses_low_rank(ranks(4, 25), 100)
    assert not uses_low_rank([{"rank": 1}, None], 100) and not uses_low_rank([], 100)


def test_regmean_takes_the_low_rank_solve_where_every_matrix_is_factored_small(
    family, dense, tmp_path, monkeypatch
):
    from mergekit_lrp.merging import low_rank_solve
    from mergekit_lrp.merging.methods import regmean as regmean_module

    capped = {n: tmp_path / f"{n}-capped.safetensors" for n in dense}
    for name, path in capped.items():
        factor_gram_file(dense[name], path, max_rank=3)  # R = 2 x 3 of 32: low rank
    # the same matrices rebuilt and stored whole: the dense solve of what the factors hold
    rebuilt = {}
    for name, path in capped.items():
        reader = ScoreReader(path)
        stored = {s: w for w, s in reader.metadata.gram_of.items()}
        tensors = {s: reader.gram(w) for s, w in stored.items()}
        rebuilt[name] = gram_file(family[name], tmp_path / f"{name}-rebuilt.safetensors",
                                  tensors=tensors)  # fmt: skip
    calls = []
    real = low_rank_solve.solve_low_rank
    monkeypatch.setattr(regmean_module, "solve_low_rank",
                        lambda *a, **k: calls.append(k.get("name")) or real(*a, **k))  # fmt: skip
    low = run(regmean(family, capped), tmp_path / "low")
    assert DOWN in calls and Q in calls
    whole = run(regmean(family, rebuilt), tmp_path / "whole")
    for name in (DOWN, Q, "model.layers.0.mlp.up_proj.weight"):
        torch.testing.assert_close(low[name], whole[name], rtol=1e-4, atol=1e-5)

"""The benchmark harness (bench/harness/): pure pieces by hand, and each entry point's
smallest path end to end, so a broken harness fails here rather than in a benchmark run."""

import json
import os
import pickle
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from merge_runner import run
from tiny_models import AS_CHECKPOINT, make_tiny_model

from harness.default_choice import (
    LRP,
    TASK_ARITHMETIC,
    base_kept,
    cell_score,
    floor_of,
    rank,
    weights_of,
)
from harness.jobs import subsets_of
from harness.merge import exact_ranks, sparsification_reused
from harness.methods import (
    BY_NAME,
    PLAIN_LRP,
    RANK_CHECK,
    Method,
    merge_config,
    method_parameters,
    orders_of,
    weights_for,
)
from harness.perf_report import markdown as perf_markdown
from harness.perf_workers import DiscardingAccumulator
from harness.quality_report import (
    objective,
    ranks_table,
    run_summary,
    summarize,
    unit_mass_table,
    validation_choice,
)
from mergekit_lrp.merging.selection import exact_keep_probabilities, keep_probabilities

REPO = Path(__file__).resolve().parent.parent


def row(method, family, density, test_mean_kept, val_mean_kept=None):
    return {
        "family": family,
        "subset": ["a", "b"],
        "method": method,
        "density": density,
        "test_mean_kept": test_mean_kept,
        "val_mean_kept": val_mean_kept or {},
    }


def test_summaries_average_each_family_then_take_mean_min_max_over_families():
    rows = [
        row("ties", "f:0", 0.5, [0.2]),
        row("ties", "f:0", 0.5, [0.4]),  # a second subset of the same family
        row("ties", "g:0", 0.5, [0.9]),
        row("dare_ties", "f:0", 0.5, [0.1, 0.3, 0.5]),  # three merge seeds
        row("task_arithmetic", "f:0", None, [0.7]),
    ]
    summary = summarize(rows)
    assert summary["ties"]["0.5"] == pytest.approx((0.6, 0.3, 0.9))
    assert summary["dare_ties"]["0.5"] == pytest.approx((0.3, 0.3, 0.3))
    assert summary["task_arithmetic"]["None"] == pytest.approx((0.7, 0.7, 0.7))


def test_validation_choice_ranks_lrp_at_weight_1_against_the_best_reference_row():
    results = {
        "densities": [0.5],
        "rows": [
            row("lrp (delta)", "f:0", 0.5, [0], {"0.5": 0.9, "1.0": 0.6}),
            row("lrp (weight)", "f:0", 0.5, [0], {"0.5": 0.1, "1.0": 0.8}),
            row("ties", "f:0", 0.5, [0], {"0.5": 0.7, "1.0": 0.2}),
            row("dare_ties", "f:0", 0.5, [0], {"0.5": 0.5, "1.0": 0.65}),
        ],
    }
    lines = validation_choice(results)
    # lrp rows only, best first at weight 1; the best reference (ties at its swept 0.7)
    assert lines[2] == "| lrp (weight) | 0.800 | 0.800 | 0.800 | +0.100 |"
    assert lines[3] == "| lrp (delta) | 0.600 | 0.600 | 0.900 | -0.100 |"
    assert lines[4] == "| best mergekit row (swept weight) | 0.700 | | | |"
    assert len(lines) == 5


def test_pinned_lrp_rows_run_their_rule_on_top_of_plain_lrp():
    shared, per_model = method_parameters(BY_NAME["lrp (delta, consensus winner)"], 0.3)
    assert shared == {**PLAIN_LRP, "consensus": "winner"}
    assert per_model == {"density": 0.3}
    defaults, per_model = method_parameters(BY_NAME["lrp (defaults)"], 0.3)
    assert defaults == {}  # unpinned: whatever lrp's defaults are
    assert weights_for(("a", "b"), BY_NAME["lrp (defaults)"]) == [1.0]  # its default weight
    ranked, _ = method_parameters(RANK_CHECK[0], 0.9)
    assert ranked["selection"] == "stochastic"  # pinned: not whatever the defaults are
    stochastic, _ = method_parameters(BY_NAME["lrp (delta, stochastic)"], 0.9)
    assert stochastic["selection"] == "stochastic"
    assert stochastic["epsilon"] == pytest.approx(0.05)  # kept inside (0, 1)


def test_method_parameters_of_mergekit_methods():
    assert method_parameters(BY_NAME["sce"], 0.3) == ({"select_topk": 0.3}, {})
    assert method_parameters(BY_NAME["della"], 0.1)[1] == pytest.approx(
        {"density": 0.1, "epsilon": 0.05}
    )
    assert method_parameters(BY_NAME["task_arithmetic"], None) == ({}, {})
    assert method_parameters(BY_NAME["circuit (no drops)"], None) == ({"base_droprate": 0.0}, {})
    # the averaged task vectors: normalize makes equal weights cancel, so one weight only
    from harness.real_bench import AVERAGED

    assert method_parameters(AVERAGED, None) == ({"normalize": True}, {})
    assert weights_for(("a", "b", "c"), AVERAGED) == [1.0]
    assert weights_for(("a", "b", "c"), BY_NAME["task_arithmetic"]) == [0.3333, 0.5, 1.0]


def test_merge_config_lists_experts_in_the_order_given_with_their_score_files(tmp_path):
    class Family:
        base = tmp_path / "base"
        experts = {"a": tmp_path / "a", "b": tmp_path / "b"}

    method = Method("m", "lrp", scores="random-{seed}", seeds=(7,))
    files = {("random-7", t): tmp_path / f"{t}.safetensors" for t in "ab"}
    config = merge_config(Family, ("b", "a"), method, 0.5, 1.0, files, seed=7)
    assert [m["model"] for m in config["models"]] == [str(tmp_path / "b"), str(tmp_path / "a")]
    assert config["models"][0]["parameters"] == {
        "weight": 1.0,
        "density": 0.5,
        "lrp_scores": str(tmp_path / "b.safetensors"),
    }
    assert "base_scores" not in config["parameters"]
    # a row that holds the base reads the base's own file of its score kind
    held = Method("h", "regmean", scores="gram-none-32", uses_density=False, base_weight=4.0)
    files = {("gram-none-32", t): tmp_path / f"{t}.safetensors" for t in ("a", "b", "base")}
    config = merge_config(Family, ("a", "b"), held, None, 1.0, files)
    assert config["parameters"] == {
        "base_scores": str(tmp_path / "base.safetensors"),
        "base_weight": 4.0,
    }
    assert config["models"][1]["parameters"]["lrp_scores"] == str(tmp_path / "b.safetensors")


def test_order_dependent_rules_are_merged_in_every_rotation():
    rotations = [("a", "b", "c"), ("b", "c", "a"), ("c", "a", "b")]
    topk_priority = BY_NAME["lrp (delta, topk, priority, normalize)"]
    assert orders_of(("a", "b", "c"), topk_priority) == rotations
    assert orders_of(("a", "b", "c"), BY_NAME["circuit (no drops)"]) == rotations
    assert orders_of(("a", "b", "c"), BY_NAME["ties"]) == [("a", "b", "c")]
    assert orders_of(("a", "b", "c"), BY_NAME["lrp (delta)"]) == [("a", "b", "c")]  # none
    unit = Method("u", "lrp", {"consensus": "unit"})
    assert orders_of(("a", "b"), unit) == [("a", "b")]


def test_run_summary_and_objective_by_hand():
    runs = [
        {"order": ["a", "b"], "kept": {"a": 0.9, "b": 0.5}, "mean": 0.7, "retention": 0.8},
        {"order": ["b", "a"], "kept": {"a": 0.7, "b": 0.7}, "mean": 0.7, "retention": None},
        {"order": ["b", "a"], "kept": {"a": 0.5, "b": 0.3}, "mean": 0.4, "retention": 1.4},
    ]
    summary = run_summary(runs)
    assert summary["per_expert"] == pytest.approx({"a": 0.7, "b": 0.5})
    assert (summary["mean"], summary["worst"]) == pytest.approx((0.6, 0.5))
    assert summary["retention"] == pytest.approx(1.1)  # the runs that have one
    assert summary["order_spread"] == pytest.approx(0.7 - 0.55)
    assert objective(summary) == pytest.approx(0.4 * 0.6 + 0.4 * 0.5 + 0.2 * 1.0)  # clipped


def test_default_choice_floor_and_ranking_by_hand():
    def record(mean, worst, delta):
        return {"mean": mean, "worst": worst, "text_delta": delta}

    assert base_kept(-0.3) == 1.0 and base_kept(0.05) == pytest.approx(0.5)
    assert base_kept(0.5) == -1.0
    assert cell_score(record(0.8, 0.6, 0.05)) == pytest.approx(0.4 * 0.8 + 0.4 * 0.6 + 0.1)
    # the floor is task arithmetic's text loss at its best validation weight (0.5 here,
    # not the weight with the smallest loss), plus the slack
    reference = {
        0.25: record(0.6, 0.5, 0.00), 0.5: record(0.9, 0.8, 0.10), 1.0: record(0.7, 0.6, 0.3)
    }
    assert floor_of(reference) == pytest.approx(0.11)
    assert weights_of(TASK_ARITHMETIC, 4) == (0.25, 0.5, 1.0)
    # a worker process receives a copy of the candidate, and still sweeps the weights
    assert weights_of(pickle.loads(pickle.dumps(TASK_ARITHMETIC)), 2) == (0.5, 1.0)
    assert weights_of(LRP[0], 4) == (1.0,)
    references = {("four", "a"): reference, ("pairs", "b"): reference, ("pairs", "c"): reference}
    records = {
        # scores highest, but loses more text than the floor in one cell
        "greedy": {
            ("four", "a"): record(1.0, 1.0, 0.2),
            ("pairs", "b"): record(1.0, 1.0, 0.0),
            ("pairs", "c"): record(1.0, 1.0, 0.0),
        },
        "safe": {
            ("four", "a"): record(0.5, 0.5, 0.0),
            ("pairs", "b"): record(0.9, 0.9, 0.0),
            ("pairs", "c"): record(0.7, 0.7, 0.0),
        },
    }
    first, second = rank(records, references)
    assert (first["name"], first["floor_failures"]) == ("safe", 0)
    assert (second["name"], second["floor_failures"], second["cells"]) == ("greedy", 1, 3)
    assert second["excess"] == pytest.approx(0.09)
    # each size counts once: the pairs' mean, then the mean over sizes
    pairs = statistics.mean(cell_score(records["safe"][("pairs", c)]) for c in "bc")
    assert first["per_size"]["pairs"] == pytest.approx(pairs)
    four = cell_score(records["safe"][("four", "a")])
    assert first["score"] == pytest.approx((pairs + four) / 2)


def test_a_resumed_run_returns_only_its_own_jobs_rows_and_keeps_the_others(tmp_path):
    from harness.jobs import PARTIAL, run_jobs

    later = {"family": "real:0", "subset": ["a", "b"], "method": "m", "density": None}
    (tmp_path / PARTIAL).write_text(json.dumps([later]))
    # no job of this call owns the saved row (a later stage's): nothing returned, and
    # the row stays saved for the stage that owns it
    assert run_jobs([], tmp_path, 1, 1, False) == []
    assert json.loads((tmp_path / PARTIAL).read_text()) == [later]


def test_subsets_list_all_experts_once():
    assert subsets_of(("a", "b"), "both") == [("a", "b")]
    assert subsets_of(("a", "b", "c"), "pairs") == [("a", "b"), ("a", "c"), ("b", "c")]
    assert subsets_of(("a", "b", "c"), "all") == [("a", "b", "c")]


def test_discarding_accumulator_drops_each_gradient_until_detached():
    from mergekit_lrp.scoring.loop import run_prompts
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.prompts import Prompt
    from mergekit_lrp.scoring.resume import LoopState

    model = make_tiny_model("llama", seed=0, **AS_CHECKPOINT).train()
    parameters = dict(model.named_parameters())
    accumulator = DiscardingAccumulator(parameters)

    def backward():
        model(input_ids=torch.tensor([[1, 5, 9]])).logits.sum().backward()

    accumulator.attach()
    backward()
    assert all(p.grad is None for p in parameters.values())
    accumulator.detach()
    backward()
    assert all(p.grad is not None for p in parameters.values())
    # lrp-compute's prompt loop drives it as it drives its own accumulators
    options = ComputeOptions(progress=False)
    state = run_prompts(model, [Prompt((1, 5, 9, 13))], options, accumulator, LoopState())
    assert state.done == 1
    assert all(p.grad is None for p in parameters.values())


def test_perf_report_orders_sections_and_ends_like_before():
    row = {"fine_tunes": 2, "setting": "dare_ties", "seconds": 1.0, "time_ratio": 1.0,
           "time_ratio_range": [1.0, 1.0], "peak_rss_mb": 400.0, "rss_ratio": 1.0}  # fmt: skip
    merge = {"size": "tiny", "fine_tunes": [2, 4], "load_1min": [0.5, 1.25], "rows": [row]}
    dtype = [{"density": 0.3, "float32_mb": 2.0, "bfloat16_mb": 1.0, "flipped_fraction": 1e-4}]
    report = perf_markdown({"score_dtype": dtype, "merge": merge}, "10M")
    assert report.index("## Merge cost (tiny Llama, 2 and 4 fine-tunes; 1-minute load average "
                        "0.50–1.25 during the run)") < report.index("## Score files")  # fmt: skip
    assert report.endswith("| 0.3 | 2 | 1 | 1.00e-04 |\n")
    assert perf_markdown({"merge": merge}, "10M").endswith(
        "| 2 | dare_ties | 1.00 | 1.00 (1.00–1.00) | 400 | 1.00 |\n\n"
    )


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.bench
def test_bench_quality_one_cell_on_the_tiny_family_then_resumes(tmp_path):
    quality = [
        "bench_quality.py",
        "--families", "tiny", "--quick", "--methods", "lrp (delta)", "--densities", "0.3",
        "--threads", "1", "--workers", "1", "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    out = tmp_path / "out"
    printed = run_script(*quality, "--out", str(out), cwd=tmp_path).stdout
    results = json.loads((out / "results.json").read_text())
    (cell,) = results["rows"]
    assert (cell["family"], cell["method"], cell["density"]) == ("tiny:0", "lrp (delta)", 0.3)
    assert cell["subset"] == ["rev", "sort", "rot", "text"]
    assert cell["weight"] in (0.25, 0.5, 1.0)
    assert set(cell["test"][0]) == set(cell["subset"])
    assert results["densities"] == [0.3]
    table = (out / "results.md").read_text()
    assert "| method | density 0.3 |" in table and "| lrp (delta) | " in table
    assert "**lrp's settings on the validation split" not in table  # nothing to rank against
    assert table in printed
    assert (out / "results.png").stat().st_size > 0
    assert not (out / "rows.partial.json").exists()

    # a run that finds the cell among the saved rows merges nothing and reports that row
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    saved = {**cell, "weight": 0.125}
    (resumed / "rows.partial.json").write_text(json.dumps([saved]))
    run_script(*quality, "--out", str(resumed), cwd=tmp_path)
    assert json.loads((resumed / "results.json").read_text())["rows"] == [saved]
    assert "| 0.3 | 0.125 |" in (resumed / "results.md").read_text()


@pytest.mark.bench
def test_bench_quality_regmean_reads_gram_files_lrp_compute_wrote(tmp_path):
    from mergekit_lrp.scores.file import ScoreReader

    row = "regmean (alpha 0.9, average, tokens relevance)"
    quality = [
        "bench_quality.py",
        "--families", "tiny", "--quick", "--methods", row, "--no-exact", "--threads", "1",
        "--workers", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    run_script(*quality, cwd=tmp_path)
    (cell,) = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert (cell["method"], cell["density"], cell["weight"]) == (row, None, 1.0)
    grams = sorted((tmp_path / "cache").glob("toy-tiny-*/scores-*/*-gram-relevance-32.safetensors"))
    assert [g.name.split("-")[0] for g in grams] == sorted(cell["subset"])
    metadata = ScoreReader(grams[0]).metadata
    assert (metadata.method, metadata.quantity, metadata.num_prompts) == ("gram", "input_gram", 32)
    assert metadata.extra["token_weighting"] == "relevance" and metadata.gram_of


@pytest.mark.bench
def test_bench_perf_times_one_merge_against_dare_ties_on_a_tiny_model(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    perf = ["bench_perf.py", "--only", "merge", "--size", "tiny", "--merges", "lrp (defaults)"]
    perf += ["--fine-tunes", "2", "4", "--repeats", "1"]
    run_script(*perf, "--out", str(out), "--cache", str(cache), cwd=tmp_path)
    merge = json.loads((out / "perf.json").read_text())["merge"]
    assert merge["size"] == "tiny" and merge["fine_tunes"] == [2, 4]
    assert [(r["fine_tunes"], r["setting"]) for r in merge["rows"]] == [
        (2, "dare_ties"), (2, "lrp (defaults)"), (4, "dare_ties"), (4, "lrp (defaults)")
    ]  # fmt: skip
    assert [len(runs) for runs in merge["runs"]["4"].values()] == [1, 1]
    assert merge["rows"][0]["time_ratio"] == 1.0
    assert all(r["time_ratio"] > 0 and r["peak_rss_mb"] > 0 for r in merge["rows"])
    report = (out / "perf.md").read_text()
    assert "## Merge cost (tiny Llama, 2 and 4 fine-tunes; 1-minute load average" in report
    assert "| 4 | lrp (defaults) | " in report
    assert not list(cache.glob("out-*"))  # each merge's output is removed after timing


@pytest.mark.bench
def test_bench_perf_times_regmean_and_its_solve_on_a_tiny_model(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    perf = ["bench_perf.py", "--only", "merge", "regmean_solve", "--size", "tiny"]
    perf += ["--merges", "regmean (defaults)", "--repeats", "1", "--fine-tunes", "2"]
    run_script(*perf, "--out", str(out), "--cache", str(cache), cwd=tmp_path)
    results = json.loads((out / "perf.json").read_text())
    assert [r["setting"] for r in results["merge"]["rows"]] == ["dare_ties", "regmean (defaults)"]
    parts = results["regmean_solve"]["profile"]["parts"]
    assert 0 < parts["factorizations"] <= parts["solve (all of it)"]
    assert parts["solve (all of it)"] < results["regmean_solve"]["profile"]["seconds"]
    (layer,) = results["regmean_solve"]["layers"]
    assert layer["hidden"] == 64 and layer["gflop_per_s"] > 0
    report = (out / "perf.md").read_text()
    assert "| regmean (defaults) | " in report and "## Where a regmean merge spends" in report


def test_exact_ranks_makes_large_tensors_sort_and_is_undone():
    importance = torch.rand(70_000, generator=torch.Generator().manual_seed(0))
    approximate = keep_probabilities(importance, 0.9, 0.05)
    with exact_ranks(True):
        exact = keep_probabilities(importance, 0.9, 0.05)
    assert torch.equal(exact, exact_keep_probabilities(importance, 0.9, 0.05))
    assert not torch.equal(approximate, exact)  # the tensor is above the size threshold
    assert torch.equal(keep_probabilities(importance, 0.9, 0.05), approximate)
    with exact_ranks(False):
        assert torch.equal(keep_probabilities(importance, 0.9, 0.05), approximate)


def test_ranks_table_puts_the_approximate_mean_inside_or_outside_the_exact_seed_range():
    def runs(values):
        return [{"kept": {"a": a, "b": 0.5}, "order": ["a", "b"]} for a in values]

    approx, exact = (m.name for m in RANK_CHECK)
    base = {"family": "f:0", "subset": ["a", "b"], "density": 0.9}
    results = {
        "tasks": {"f:0": ["a", "b"]},
        "rows": [
            {**base, "method": approx, "test_runs": runs([0.80, 0.84, 0.82])},
            {**base, "method": exact, "test_runs": runs([0.81, 0.85, 0.79])},
        ],
    }
    table = ranks_table(results)
    assert table[2] == "| f:0 | 0.9 | a | [0.790, 0.850] | 0.820 | yes |"
    results["rows"][0]["test_runs"] = runs([0.90, 0.91, 0.92])
    assert ranks_table(results)[2].endswith("| 0.910 | no |")


def test_unit_mass_table_differences_by_family_and_by_seed():
    def runs(means):
        return [{"kept": {"a": m, "b": m}, "mean": m, "order": ["a", "b"]} for m in means]

    rows = []
    cells = (("f:0", [0.8, 0.9], [0.7, 0.7]), ("g:1", [0.5, 0.5], [0.6, 0.6]))
    for family, relevance, magnitude in cells:
        for method, means in (
            ("lrp (delta, stochastic, unit, normalize)", relevance),
            ("lrp (delta, stochastic, unit, |delta| mass, normalize)", magnitude),
        ):
            rows.append({"family": family, "subset": ["a", "b"], "method": method,
                         "density": 0.9, "test_runs": runs(means)})  # fmt: skip
    results = {"tasks": {"f:0": ["a", "b"], "g:1": ["a", "b"]}, "families": ["f:0", "g:1"],
               "densities": [0.9], "rows": rows}  # fmt: skip
    (line,) = unit_mass_table(results)[2:]
    assert line == "| stochastic | 0.9 | +0.025 [-0.100, +0.150] | [-0.100, +0.200] |"


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_reused_sparsification_merges_bit_identically_and_sorts_each_tensor_once(
    family, tmp_path, method, monkeypatch
):
    import mergekit.sparsify as sparsify

    def config(weight):
        models = [
            {"model": str(family[n]), "parameters": {"weight": weight, "density": 0.4}}
            for n in ("ft_a", "ft_b")
        ]
        return {
            "merge_method": method,
            "base_model": str(family["base"]),
            "models": models,
            "parameters": {"normalize": False},  # else the weights cancel
            "dtype": "float32",
        }

    plain = {w: run(config(w), tmp_path / f"plain-{w}") for w in (0.5, 1.0)}
    sorts = []
    for name in ("magnitude", "magnitude_outliers"):
        real = getattr(sparsify, name)
        monkeypatch.setattr(sparsify, name, lambda *a, _f=real, **k: sorts.append(1) or _f(*a, **k))
    with sparsification_reused():
        reused = {w: run(config(w), tmp_path / f"reused-{w}") for w in (0.5, 1.0)}
        first = len(sorts)
    assert first > 0 and len(sorts) == first  # the second weight sorted nothing again
    for weight in plain:
        assert plain[weight].keys() == reused[weight].keys()
        for name, tensor in plain[weight].items():
            assert torch.equal(tensor, reused[weight][name]), (weight, name)
    assert not all(torch.equal(plain[0.5][n], plain[1.0][n]) for n in plain[0.5])

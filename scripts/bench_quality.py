"""Merge-quality benchmark: `lrp` against mergekit's methods on the locally built toy family.

    python scripts/bench_quality.py [--quick] [--out bench-out/quality] [--cache DIR]

Builds (or reuses) the toy family (docs/toy-family.md), computes AttnLRP scores of every
expert with lrp-compute's code on calibration prompts of its own task (disjoint from the
evaluation splits), then merges every pair of experts and all experts together with each
method at each density, through mergekit's real `run_merge`. The per-model weight is part
of each method's setting: it is chosen from {1/N, 0.5, 1} on the validation split, and the
test split is reported at that weight. Random methods run over 3 seeds.

Metric: for each task, the fraction of its expert's answer-NLL improvement over the base
that the merged model keeps (1 = as good as the expert, 0 = the base, < 0 worse); exact
match of greedy answers is reported beside it on the test split. Writes results.json,
results.md and results.png into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    """One row of the table: a mergekit method and its fixed settings."""

    name: str
    merge_method: str
    params: dict = field(default_factory=dict)
    seeds: tuple = (None,)  # several for random methods
    scores: str | None = None  # score-set key for lrp: "<target>-<n prompts>"
    uses_density: bool = True


DEFAULT_SCORES = "predicted-128"
METHODS = [
    Method("lrp (delta)", "lrp", {"importance": "delta"}, scores=DEFAULT_SCORES),
    Method("lrp (weight)", "lrp", {"importance": "weight"}, scores=DEFAULT_SCORES),
    Method("task_arithmetic", "task_arithmetic", uses_density=False),
    Method("ties", "ties"),
    Method("dare_ties", "dare_ties", seeds=(0, 1, 2)),
    Method("della", "della", seeds=(0, 1, 2)),
    Method("breadcrumbs_ties", "breadcrumbs_ties"),
    Method("sce", "sce"),
]
VARIANTS = [  # the questions the issue asks when lrp does not win, one row each
    Method(
        "lrp (delta, next-token target)", "lrp", {"importance": "delta"}, scores="next-token-128"
    ),
    Method(
        "lrp (delta, sign consensus)",
        "lrp",
        {"importance": "delta", "consensus": "sum"},
        scores=DEFAULT_SCORES,
    ),
    Method(
        "lrp (delta, 16 calibration prompts)", "lrp", {"importance": "delta"}, scores="predicted-16"
    ),
    Method(
        "lrp (delta, rescale)",
        "lrp",
        {"importance": "delta", "rescale": True},
        scores=DEFAULT_SCORES,
    ),
]
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def method_parameters(method: Method, density: float) -> tuple[dict, dict]:
    """(global parameters, per-model parameters) of one merge."""
    per_model = {}
    if method.uses_density:
        if method.merge_method == "sce":
            return {"select_topk": density, **method.params}, per_model
        per_model["density"] = density
        if method.merge_method == "della":  # density +/- epsilon must stay inside (0, 1)
            per_model["epsilon"] = min(0.15, 0.5 * min(density, 1 - density))
    return dict(method.params), per_model


def merge_config(family, subset, method: Method, density, weight, score_files) -> dict:
    shared, per_model = method_parameters(method, density)
    models = []
    for task in subset:
        params = {"weight": weight, **per_model}
        if method.scores:
            params["lrp_scores"] = str(score_files[(method.scores, task)])
        models.append({"model": str(family.experts[task]), "parameters": params})
    return {
        "merge_method": method.merge_method,
        "base_model": str(family.base),
        "parameters": shared,
        "models": models,
        "dtype": "float32",
    }


def run_merge(config: dict, out: Path, seed) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(
        quiet=True, random_seed=seed, copy_tokenizer=False, write_model_card=False
    )
    mergekit_run_merge(MergeConfiguration.model_validate(config), str(out), options)


def compute_score_files(family, keys, root: Path, progress) -> dict:
    """lrp-compute's scoring on each expert, for each score-set key; cached on disk."""
    from mergekit_lrp.compute import ComputeOptions, compute_scores

    files = {}
    for key in sorted(keys):
        target, count = key.rsplit("-", 1)
        for task, expert in family.experts.items():
            out = root / f"{task}-{key}.safetensors"
            if not out.exists():
                prompts = root / f"{task}-calibration-{count}.txt"
                lines = family.calibration_prompts(task, int(count))
                prompts.write_text("\n".join(p.replace("\n", " ") for p in lines) + "\n")
                options = ComputeOptions(target=target, max_length=256, progress=False)
                compute_scores(str(expert), str(prompts), str(out), options)
                progress(f"scored {task} ({key})")
            files[(key, task)] = out
    return files


def evaluate(model_dir: Path, family, split: str, exact: bool) -> dict[str, dict]:
    """Per task: kept fraction (always) and exact match (when asked, skills only)."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.toy import kept_fraction
    from mergekit_lrp.toy.evaluate import answer_nll, score_task

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    metrics = {}
    for task in family.tasks:
        examples = family.eval_examples(task, split)
        task_object = family.task_objects[task]
        if exact:
            metrics[task] = score_task(model, family.tokenizer, task_object, examples)
        else:
            metrics[task] = {
                "answer_nll": answer_nll(model, family.tokenizer, task_object, examples),
                "exact_match": None,
            }
    kept = kept_fraction(metrics, family, split)
    return {t: {"kept": kept[t], "exact_match": metrics[t]["exact_match"]} for t in metrics}


def subsets_of(tasks, quick: bool, which: str = "both") -> list[tuple[str, ...]]:
    pairs = list(itertools.combinations(tasks, 2))
    pairs = pairs[:1] if quick else pairs
    return {"pairs": pairs, "all": [tuple(tasks)], "both": pairs + [tuple(tasks)]}[which]


def subset_mean(metrics: dict, subset) -> float:
    return statistics.mean(metrics[t]["kept"] for t in subset)


def run(args) -> dict:
    from tqdm import tqdm

    from mergekit_lrp.toy import build_family

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    family = build_family(Path(args.cache), preset=args.preset, progress=True)
    methods = [m for m in METHODS if not args.quick or m.name in QUICK_METHODS]
    if args.variants and not args.quick:
        methods += VARIANTS
    densities = (0.3, 0.7) if args.quick else DENSITIES
    score_root = family.root / "scores"
    score_root.mkdir(exist_ok=True)
    bar = tqdm(total=0, unit="merge", desc="merges", file=sys.stderr)
    score_files = compute_score_files(
        family, {m.scores for m in methods if m.scores}, score_root, bar.write
    )
    subsets = subsets_of(family.tasks, args.quick, args.subsets)
    jobs = []
    for subset in subsets:
        weights = sorted({round(1 / len(subset), 4), 0.5, 1.0})
        for method in methods:
            for density in densities if method.uses_density else (None,):
                jobs.append((subset, method, density, weights))
    bar.total = sum(len(w) * len(m.seeds) for _, m, _, w in jobs)
    bar.refresh()
    partial = Path(args.out) / "rows.partial.json"
    rows = json.loads(partial.read_text()) if partial.exists() else []
    done = {(tuple(r["subset"]), r["method"], r["density"]) for r in rows}
    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    try:
        for subset, method, density, weights in jobs:
            if (subset, method.name, density) in done:  # finished by an interrupted run
                bar.update(len(weights) * len(method.seeds))
                continue
            val = {}
            for weight in weights:
                per_seed = []
                for seed in method.seeds:
                    out = scratch / "merged"
                    config = merge_config(family, subset, method, density, weight, score_files)
                    run_merge(config, out, seed)
                    per_seed.append(subset_mean(evaluate(out, family, "val", False), subset))
                    shutil.rmtree(out)
                    bar.update(1)
                val[weight] = statistics.mean(per_seed)
            chosen = max(weights, key=lambda w: (val[w], -w))
            tests = []
            for seed in method.seeds:
                out = scratch / "merged"
                config = merge_config(family, subset, method, density, chosen, score_files)
                run_merge(config, out, seed)
                tests.append(evaluate(out, family, "test", exact=not args.no_exact))
                shutil.rmtree(out)
            rows.append(
                {
                    "subset": list(subset),
                    "method": method.name,
                    "density": density,
                    "weight": chosen,
                    "val_mean_kept": val,
                    "test": tests,
                    "test_mean_kept": [subset_mean(t, subset) for t in tests],
                }
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        bar.close()
    return {
        "preset": args.preset,
        "quick": args.quick,
        "family": str(family.root),
        "tasks": list(family.tasks),
        "densities": list(densities),
        "methods": [m.name for m in methods],
        "rows": rows,
        "seconds": time.perf_counter() - started,
        "command": " ".join(["python", "scripts/bench_quality.py", *sys.argv[1:]]),
    }


QUICK_METHODS = {"lrp (delta)", "task_arithmetic", "ties", "dare_ties"}


def summarize(results: dict) -> dict:
    """method -> density -> (mean over subsets of the seed-mean, min and max over seeds)."""
    table: dict = {}
    for row in results["rows"]:
        scores = row["test_mean_kept"]
        cell = table.setdefault(row["method"], {}).setdefault(str(row["density"]), [])
        cell.append((statistics.mean(scores), min(scores), max(scores)))
    return {
        method: {
            d: tuple(statistics.mean(x[i] for x in cells) for i in range(3))
            for d, cells in by_density.items()
        }
        for method, by_density in table.items()
    }


def markdown(results: dict) -> str:
    summary = summarize(results)
    densities = [str(d) for d in results["densities"]]
    lines = [
        f"Mean over the merged subsets ({results['subsets']}) of the mean test-split kept "
        "fraction of each expert's answer-NLL improvement (1 = expert, 0 = base); "
        "random methods: mean over seeds [min, max].",
        "",
        "| method | " + " | ".join(f"density {d}" for d in densities) + " |",
        "|---|" + "---|" * len(densities),
    ]
    for method, by_density in summary.items():
        if "None" in by_density:
            mean, low, high = by_density["None"]
            cells = [f"{mean:.3f} (no density)"] * len(densities)
        else:
            cells = []
            for d in densities:
                mean, low, high = by_density[d]
                spread = f" [{low:.3f}, {high:.3f}]" if high > low else ""
                cells.append(f"{mean:.3f}{spread}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per subset (test kept fraction per task at the chosen weight, exact match "
        "in parentheses):",
        "",
        "| subset | method | density | weight | per task | mean |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        test = row["test"][0]
        per_task = ", ".join(
            f"{t} {test[t]['kept']:.2f}"
            + (f" ({test[t]['exact_match']:.2f})" if test[t]["exact_match"] is not None else "")
            for t in row["subset"]
        )
        mean = statistics.mean(row["test_mean_kept"])
        lines.append(
            f"| {'+'.join(row['subset'])} | {row['method']} | {row['density']} | "
            f"{row['weight']} | {per_task} | {mean:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    densities = results["densities"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for method, by_density in summary.items():
        if "None" in by_density:
            axis.axhline(by_density["None"][0], linestyle=":", color="gray", label=method)
            continue
        means = [by_density[str(d)][0] for d in densities]
        (line,) = axis.plot(densities, means, marker="o", label=method)
        lows = [by_density[str(d)][1] for d in densities]
        highs = [by_density[str(d)][2] for d in densities]
        if any(h > lo for h, lo in zip(highs, lows, strict=True)):
            axis.fill_between(densities, lows, highs, alpha=0.2, color=line.get_color())
    axis.set_xlabel("density")
    axis.set_ylabel("kept fraction of expert improvement (test)")
    axis.set_ylim(-0.2, 1.0)
    axis.set_title(f"Merge quality on the toy family ({results['subsets']}); "
                   "values below -0.2 clipped", fontsize=10)
    axis.legend(fontsize=7, ncol=2, loc="lower right")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="quick family, one pair + all experts, 4 methods, 2 densities",
    )
    parser.add_argument(
        "--preset", default=None, help="family preset (default: full, or quick with --quick)"
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run the lrp variant rows (target, consensus, calibration)",
    )
    parser.add_argument("--no-exact", action="store_true", help="skip exact-match decoding")
    parser.add_argument("--subsets", choices=("both", "pairs", "all"), default="both",
                        help="merge every pair of experts, all experts together, or both")
    parser.add_argument("--out", default="bench-out/quality")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.preset = args.preset or ("quick" if args.quick else "full")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "rows.partial.json").unlink(missing_ok=True)
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot(results, out / "results.png")
    print(table)
    print(f"{results['seconds'] / 60:.1f} min; wrote {out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()

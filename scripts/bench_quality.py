"""Merge-quality benchmark: `lrp` against mergekit's methods on the locally built toy families.

    python scripts/bench_quality.py [--quick] [--families NAME[:SEED] ...] [--out DIR]

Builds (or reuses) every accepted toy family (docs/toy-family.md; `--families` picks
others), computes AttnLRP scores of every
expert with lrp-compute's code on calibration prompts of its own task (disjoint from the
evaluation splits), then merges every pair of experts and all experts together with each
method at each density, through mergekit's real `run_merge`. The per-model weight is part
of each method's setting: it is chosen from {1/N, 0.5, 1} on the validation split, and the
test split is reported at that weight. Random methods run over 3 seeds.

Each table cell is the mean over families of the family's value (itself the mean over
the merged subsets and, for random methods, merge seeds), with the [min, max] over
families; results.json holds each family's own tables under "per_family".

Metric: for each task, the fraction of its expert's answer-NLL improvement over the base
that the merged model keeps (1 = as good as the expert, 0 = the base, < 0 worse); exact
match of greedy answers is reported beside it on the test split. Writes results.json,
results.md and results.png into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    """One row of the table: a mergekit method and its fixed settings."""

    name: str
    merge_method: str
    params: dict = field(default_factory=dict)
    seeds: tuple = (None,)  # several for random methods
    #: score-set key for lrp: "[<signal>:]<target>-<n prompts>", or "random-{seed}"
    scores: str | None = None
    uses_density: bool = True
    uses_weight: bool = True  # circuit takes no per-model weight (priority decides)
    reversed_order: bool = False  # list the experts last task first (circuit's priority)
    #: lrp rows name their rule on top of PLAIN_LRP, so they keep their meaning when lrp's
    #: defaults change; "lrp (defaults)" alone runs whatever the defaults are
    pinned: bool = True


DEFAULT_SCORES = "predicted-128"
#: lrp's rules before the merge-rules issue chose new defaults: per-tensor top-k, the
#: weighted kept deltas added
PLAIN_LRP = {"selection": "topk", "consensus": "none", "normalize": False}
METHODS = [
    Method("lrp (defaults)", "lrp", scores=DEFAULT_SCORES, seeds=(0, 1, 2), pinned=False),
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
#: lrp's selection and sign rules and Circuit-Merge (issue 14), each a row beside METHODS
RULES = [
    *(
        Method(f"lrp (delta, consensus {c})", "lrp", {"consensus": c}, scores=DEFAULT_SCORES)
        for c in ("relevance", "winner", "drop")
    ),
    Method("lrp (delta, rescale mass)", "lrp", {"rescale": "mass"}, scores=DEFAULT_SCORES),
    Method(
        "lrp (delta, stochastic)",
        "lrp",
        {"selection": "stochastic"},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
    ),
    *(
        Method(f"lrp (delta, {b} budget)", "lrp", {"budget": b}, scores=DEFAULT_SCORES)
        for b in ("layer", "model")
    ),
    *(  # TIES-style disjoint mean: agreeing kept entries averaged, lone ones kept whole
        Method(
            f"lrp (delta, {c}, normalize)",
            "lrp",
            {"consensus": c, "normalize": True},
            scores=DEFAULT_SCORES,
        )
        for c in ("sum", "winner")
    ),
    *(
        Method(
            f"lrp (delta, stochastic, {c}, normalize)",
            "lrp",
            {"selection": "stochastic", "consensus": c, "normalize": True},
            scores=DEFAULT_SCORES,
            seeds=(0, 1, 2),
        )
        for c in ("sum", "relevance", "winner")
    ),
    # Circuit-Merge's conflict rule (the first-listed model wins) inside lrp
    Method("lrp (delta, priority)", "lrp", {"consensus": "priority"}, scores=DEFAULT_SCORES),
    Method(
        "lrp (delta, priority, normalize)",
        "lrp",
        {"consensus": "priority", "normalize": True},
        scores=DEFAULT_SCORES,
    ),
    Method(
        "lrp (delta, stochastic, priority, normalize)",
        "lrp",
        {"selection": "stochastic", "consensus": "priority", "normalize": True},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
    ),
    Method(
        "lrp (delta, stochastic, priority, normalize, reversed priority)",
        "lrp",
        {"selection": "stochastic", "consensus": "priority", "normalize": True},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
        reversed_order=True,
    ),
    Method(
        "lrp (delta, stochastic, priority)",
        "lrp",
        {"selection": "stochastic", "consensus": "priority"},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
    ),
    Method(
        "circuit (|delta| order)", "circuit", seeds=(0, 1, 2), uses_density=False, uses_weight=False
    ),
    Method(
        "circuit (score order)",
        "circuit",
        {"drop_order": "scores"},
        scores=DEFAULT_SCORES,
        seeds=(0, 1, 2),
        uses_density=False,
        uses_weight=False,
    ),
]
#: where Circuit-Merge's lead comes from: its combination without any drops, and the
#: other priority order
CIRCUIT_PARTS = [
    Method(
        "circuit (no drops)",
        "circuit",
        {"base_droprate": 0.0},
        uses_density=False,
        uses_weight=False,
    ),
    Method(
        "circuit (reversed priority)",
        "circuit",
        seeds=(0, 1, 2),
        uses_density=False,
        uses_weight=False,
        reversed_order=True,
    ),
    Method(
        "circuit (no drops, reversed priority)",
        "circuit",
        {"base_droprate": 0.0},
        uses_density=False,
        uses_weight=False,
        reversed_order=True,
    ),
    *(  # drops ranked by |delta| or by relevance once the keep probabilities differ
        Method(
            f"circuit ({order} order, epsilon 0.2)",
            "circuit",
            {"epsilon": 0.2, **({"drop_order": "scores"} if order == "score" else {})},
            scores=DEFAULT_SCORES if order == "score" else None,
            seeds=(0, 1, 2),
            uses_density=False,
            uses_weight=False,
        )
        for order in ("|delta|", "score")
    ),
]
#: the signal ablation (issue 12): the same lrp selection (per-tensor top-k, same densities
#: and weight sweep), only the importance signal changes
ABLATION = [
    Method(
        "random top-k", "lrp", {"importance": "scores"}, scores="random-{seed}", seeds=(0, 1, 2)
    ),
    Method("magnitude |delta|", "lrp", {"missing_scores": "magnitude"}),
    Method("gradient (delta)", "lrp", {"importance": "delta"}, scores="gradient:predicted-128"),
    Method("fisher (delta)", "lrp", {"importance": "delta"}, scores="fisher:predicted-128"),
    Method("activation (delta)", "lrp", {"importance": "delta"}, scores="activation:predicted-128"),
    Method("attnlrp (delta)", "lrp", {"importance": "delta"}, scores=DEFAULT_SCORES),
    Method("attnlrp (weight)", "lrp", {"importance": "weight"}, scores=DEFAULT_SCORES),
    Method("attnlrp next-token (delta)", "lrp", {"importance": "delta"}, scores="next-token-128"),
]
DENSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def method_parameters(method: Method, density: float) -> tuple[dict, dict]:
    """(global parameters, per-model parameters) of one merge."""
    per_model = {}
    params = dict(method.params)
    if method.merge_method == "lrp" and method.pinned:
        params = {**PLAIN_LRP, **params}
    if method.uses_density:
        if method.merge_method == "sce":
            return {"select_topk": density, **params}, per_model
        per_model["density"] = density
        if method.merge_method == "della":  # density +/- epsilon must stay inside (0, 1)
            per_model["epsilon"] = min(0.15, 0.5 * min(density, 1 - density))
        if params.get("selection") == "stochastic" and method.pinned:  # the same bound
            params["epsilon"] = min(0.1, 0.5 * min(density, 1 - density))
    return params, per_model


def merge_config(family, subset, method: Method, density, weight, score_files, seed=None) -> dict:
    shared, per_model = method_parameters(method, density)
    models = []
    for task in reversed(subset) if method.reversed_order else subset:
        params = {"weight": weight, **per_model} if method.uses_weight else dict(per_model)
        if method.scores:
            params["lrp_scores"] = str(score_files[(method.scores.format(seed=seed), task)])
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


def scoring_code_hash() -> str:
    """A hash of the code that computes scores: cached score files are reused only while
    it is unchanged (the family's cache key covers the code that trains the models)."""
    import hashlib

    import mergekit_lrp

    package = Path(mergekit_lrp.__file__).parent
    sources = sorted((package / "scoring").rglob("*.py")) + sorted(
        (package / "scores").glob("*.py")
    )
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def compute_score_files(family, keys, root: Path, progress) -> dict:
    """Score files of each expert, for each score-set key; cached on disk.

    ``[<signal>:]<target>-<n>``: lrp-compute's scoring with ``--method signal`` (default
    attnlrp) on n calibration prompts of the expert's task; ``random-<seed>``: uniform
    random scores (the floor of the ablation), seeded, with the expert's fingerprint.
    """
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores

    files = {}
    for key in sorted(keys):
        for task, expert in family.experts.items():
            out = root / f"{task}-{key.replace(':', '-')}.safetensors"
            if not out.exists():
                if key.startswith("random-"):
                    random_scores(expert, out, int(key.split("-")[1]))
                else:
                    signal, _, rest = key.rpartition(":")
                    target, count = rest.rsplit("-", 1)
                    prompts = root / f"{task}-calibration-{count}.txt"
                    lines = family.calibration_prompts(task, int(count))
                    prompts.write_text("\n".join(p.replace("\n", " ") for p in lines) + "\n")
                    options = ComputeOptions(
                        method=signal or "attnlrp", target=target, max_length=256, progress=False
                    )
                    compute_scores(str(expert), str(prompts), str(out), options)
                progress(f"scored {task} ({key})")
            files[(key, task)] = out
    return files


def random_scores(model_dir: Path, out: Path, seed: int) -> None:
    from safetensors import safe_open

    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files, fingerprint_tensors

    tensor_files = checkpoint_tensor_files(model_dir)
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name in sorted(tensor_files):
        with safe_open(tensor_files[name], framework="pt") as handle:
            shape = handle.get_slice(name).get_shape()
        scores[name] = torch.rand(shape, generator=generator)
    meta = ScoreMetadata(
        model_fingerprint=fingerprint_tensors(tensor_files),
        num_prompts=0,
        num_tokens=0,
        target="random",
        model_type="",
        method="random",
        extra={"seed": str(seed)},
    )
    write_scores(out, scores, meta, dtype=torch.float32)


def evaluate(model_dir: Path, family, split: str, exact: bool, tasks=None) -> dict[str, dict]:
    """Per task of ``tasks`` (default: all): kept fraction, and exact match when asked."""
    from transformers import AutoModelForCausalLM

    from toy_family import kept_fraction
    from toy_family.evaluate import answer_nll, score_task

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    metrics = {}
    for task in tasks or family.tasks:
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
    everything = [tuple(tasks)]
    pairs = [p for p in itertools.combinations(tasks, 2) if p != everything[0]]
    pairs = pairs[:1] if quick else pairs
    # with two tasks the only pair is all experts: it is listed once, as all experts
    return {"pairs": pairs, "all": everything, "both": pairs + everything}[which]


def weights_for(subset, method: Method | None = None) -> list[float]:
    """The per-model weights swept on the validation split: {1/N, 0.5, 1} (one
    placeholder for a method without weights)."""
    if method is not None and not method.uses_weight:
        return [1.0]
    return sorted({round(1 / len(subset), 4), 0.5, 1.0})


def subset_mean(metrics: dict, subset) -> float:
    return statistics.mean(metrics[t]["kept"] for t in subset)


def selected_methods(args) -> list[Method]:
    methods = [m for m in METHODS if not args.quick or m.name in QUICK_METHODS]
    if args.variants and not args.quick:
        methods += VARIANTS
    if args.rules and not args.quick:
        methods += RULES + CIRCUIT_PARTS
    if args.ablation:
        methods = list(ABLATION)
    if args.methods:
        known = {m.name: m for m in METHODS + VARIANTS + RULES + CIRCUIT_PARTS + ABLATION}
        unknown = [name for name in args.methods if name not in known]
        if unknown:
            raise SystemExit(f"unknown --methods {unknown}; known: {sorted(known)}")
        methods = [known[name] for name in args.methods]
    if args.quick:  # a smoke run: one merge seed, 32 calibration prompts
        methods = [
            replace(
                m,
                seeds=m.seeds[:1],
                scores=m.scores and m.scores.replace("-128", f"-{QUICK_PROMPTS}"),
            )
            for m in methods
        ]
    return methods


@dataclass(frozen=True)
class Job:
    """One table cell on one family: a method at a density on a subset of experts."""

    family: object  # toy_family.Family
    subset: tuple
    method: Method
    density: float | None
    score_files: dict

    @property
    def key(self) -> tuple:
        return (family_id(self.family), self.subset, self.method.name, self.density)

    @property
    def merges(self) -> int:
        """Validation merges (the progress bar's unit)."""
        return len(weights_for(self.subset, self.method)) * len(self.method.seeds)


def family_jobs(args, family, methods, densities, progress) -> list[Job]:
    """Score the experts (cached) and list every cell of ``methods`` on ``family``."""
    from toy_family import Family

    score_root = family.root / f"scores-{scoring_code_hash()}"
    score_root.mkdir(exist_ok=True)
    score_files = compute_score_files(
        family,
        {m.scores.format(seed=seed) for m in methods if m.scores for seed in m.seeds},
        score_root,
        progress,
    )
    family = Family(root=family.root, preset=family.preset, seed=family.seed)  # picklable
    quick = args.quick
    return [
        Job(family, subset, method, density, score_files)
        for subset in subsets_of(family.tasks, quick, "all" if quick else args.subsets)
        for method in methods
        for density in (densities if method.uses_density else (None,))
    ]


def merge_row(job: Job, exact: bool) -> dict:
    """Choose the weight on the validation split, then score the test split at it."""
    family, subset, method, density = job.family, job.subset, job.method, job.density
    scratch = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    out = scratch / "merged"
    try:
        val = {}
        for weight in weights_for(subset, method):
            per_seed = []
            for seed in method.seeds:
                config = merge_config(
                    family, subset, method, density, weight, job.score_files, seed
                )
                run_merge(config, out, seed)
                # the weight is chosen on the merged tasks only; the test split scores all
                per_seed.append(subset_mean(evaluate(out, family, "val", False, subset), subset))
                shutil.rmtree(out)
            val[weight] = statistics.mean(per_seed)
        chosen = max(val, key=lambda w: (val[w], -w))
        tests = []
        for seed in method.seeds:
            config = merge_config(family, subset, method, density, chosen, job.score_files, seed)
            run_merge(config, out, seed)
            tests.append(evaluate(out, family, "test", exact=exact))
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "family": family_id(family),
        "family_seed": family.seed,
        "subset": list(subset),
        "method": method.name,
        "density": density,
        "weight": chosen,
        "val_mean_kept": val,
        "test": tests,
        "test_mean_kept": [subset_mean(t, subset) for t in tests],
    }


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], args, rows: list, bar) -> None:
    """Run ``jobs`` over ``args.workers`` processes; rows are saved as they finish."""
    if args.workers == 1:
        for job in jobs:
            rows.append(merge_row(job, exact=not args.no_exact))
            bar.update(job.merges)
            save_partial(args, rows)
        return
    threads = max(1, args.threads // args.workers)
    context = multiprocessing.get_context("spawn")  # no fork after OpenMP started
    with ProcessPoolExecutor(
        args.workers, mp_context=context, initializer=_start_worker, initargs=(threads,)
    ) as pool:
        running = {pool.submit(merge_row, job, not args.no_exact): job for job in jobs}
        for future in as_completed(running):
            rows.append(future.result())
            bar.update(running[future].merges)
            save_partial(args, rows)


def row_key(row: dict) -> tuple:
    """The :attr:`Job.key` a finished row belongs to."""
    return (row["family"], tuple(row["subset"]), row["method"], row["density"])


def family_id(family) -> str:
    return f"{family.preset}:{family.seed}"


def parse_families(names: list[str] | None) -> list[tuple[str, int]]:
    """``NAME`` (with its accepted seed, else 0) or ``NAME:SEED``; default: every accepted one."""
    from toy_family import ACCEPTED, PRESETS

    if not names:
        if not ACCEPTED:
            raise SystemExit("no accepted toy family yet; name one with --families")
        return list(ACCEPTED.items())
    chosen = []
    for name in names:
        preset, _, seed = name.partition(":")
        if preset not in PRESETS:
            raise SystemExit(f"unknown family {preset!r}; known: {sorted(PRESETS)}")
        chosen.append((preset, int(seed) if seed else ACCEPTED.get(preset, 0)))
    return chosen


def save_partial(args, rows) -> None:
    partial = Path(args.out) / "rows.partial.json"
    partial.with_suffix(".tmp").write_text(json.dumps(rows))
    partial.with_suffix(".tmp").replace(partial)


def run(args) -> dict:
    from tqdm import tqdm

    from toy_family import build_family

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    methods = selected_methods(args)
    densities = QUICK_DENSITIES if args.quick else DENSITIES
    families = [
        build_family(Path(args.cache), preset=preset, seed=seed, progress=True)
        for preset, seed in parse_families(args.families)
    ]
    jobs = [
        job
        for family in families
        for job in family_jobs(args, family, methods, densities, progress=print)
    ]
    partial = Path(args.out) / "rows.partial.json"
    rows = json.loads(partial.read_text()) if partial.exists() else []
    done = {row_key(r) for r in rows}
    todo = [job for job in jobs if job.key not in done]  # the rest finished in an earlier run
    bar = tqdm(
        total=sum(j.merges for j in jobs),
        initial=sum(j.merges for j in jobs if j.key in done),
        unit="merge",
        desc="merges",
        file=sys.stderr,
    )
    try:
        run_jobs(todo, args, rows, bar)
    finally:
        bar.close()
    order = {job.key: index for index, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[row_key(r)])
    return {
        "quick": args.quick,
        "families": [family_id(f) for f in families],
        "family_roots": {family_id(f): str(f.root) for f in families},
        "architectures": {family_id(f): f.recipe.architecture for f in families},
        "tasks": {family_id(f): list(f.tasks) for f in families},
        "subsets": args.subsets,
        "densities": list(densities),
        "methods": [m.name for m in methods],
        "rows": rows,
        "per_family": {
            family_id(f): per_family_tables(
                [r for r in rows if r["family"] == family_id(f)], f.tasks
            )
            for f in families
        },
        "seconds": time.perf_counter() - started,
        "workers": args.workers,
        "command": " ".join(["python", "scripts/bench_quality.py", *sys.argv[1:]]),
    }


QUICK_METHODS = {"lrp (defaults)", "task_arithmetic", "ties", "dare_ties"}
QUICK_DENSITIES = (0.5,)
QUICK_PROMPTS = 32


def subset_kinds(results: dict) -> list[tuple[str, list[dict]]]:
    """The rows split into two-expert pairs and all-experts merges (those present)."""
    everything = {f: set(t) for f, t in results["tasks"].items()}
    full = [r for r in results["rows"] if set(r["subset"]) == everything[r["family"]]]
    kinds = [("pairs", [r for r in results["rows"] if r not in full]), ("all experts", full)]
    return [(name, rows) for name, rows in kinds if rows]


def family_values(rows: list[dict]) -> dict:
    """method -> density -> family -> the family's value: the mean over its merged subsets
    and merge seeds of the test-split kept fraction (mean over the subset's tasks)."""
    values: dict = {}
    for row in rows:
        by_family = values.setdefault(row["method"], {}).setdefault(str(row["density"]), {})
        by_family.setdefault(row["family"], []).extend(row["test_mean_kept"])
    return {
        method: {
            d: {f: statistics.mean(v) for f, v in by_family.items()}
            for d, by_family in by_density.items()
        }
        for method, by_density in values.items()
    }


def summarize(rows: list[dict]) -> dict:
    """method -> density -> (mean, min, max) over families of each family's value."""
    return {
        method: {
            d: (statistics.mean(v := list(by_family.values())), min(v), max(v))
            for d, by_family in by_density.items()
        }
        for method, by_density in family_values(rows).items()
    }


def per_family_tables(rows: list[dict], tasks) -> dict:
    """One family's own tables: subset kind -> method -> density -> value."""
    kinds = {
        "pairs": [r for r in rows if set(r["subset"]) != set(tasks)],
        "all experts": [r for r in rows if set(r["subset"]) == set(tasks)],
    }
    return {
        kind: {
            method: {d: next(iter(by_family.values())) for d, by_family in by_density.items()}
            for method, by_density in family_values(kind_rows).items()
        }
        for kind, kind_rows in kinds.items()
        if kind_rows
    }


def summary_table(rows: list[dict], densities) -> list[str]:
    densities = [str(d) for d in densities]
    lines = [
        "| method | " + " | ".join(f"density {d}" for d in densities) + " |",
        "|---|" + "---|" * len(densities),
    ]
    for method, by_density in summarize(rows).items():
        if "None" in by_density:
            mean, low, high = by_density["None"]
            spread = f" [{low:.3f}, {high:.3f}]" if high > low else ""
            cells = [f"{mean:.3f}{spread} (no density)"] * len(densities)
        else:
            cells = []
            for d in densities:
                mean, low, high = by_density[d]
                spread = f" [{low:.3f}, {high:.3f}]" if high > low else ""
                cells.append(f"{mean:.3f}{spread}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def validation_choice(results: dict) -> list[str]:
    """lrp's settings ranked on the validation split as its defaults are chosen
    (docs/BENCHMARKS.md): at lrp's default weight 1 (a default setting is used without a
    weight sweep), mean over families, then over densities; beside it the same mean at
    the weight the sweep chose, and the margin to the best mergekit row at each density
    (that row at its chosen weight)."""
    default_weight: dict = {}
    best_weight: dict = {}
    for row in results["rows"]:
        key = (row["method"], row["density"], row["family"])
        val = {float(w): v for w, v in row["val_mean_kept"].items()}  # JSON keys are str
        best_weight.setdefault(key, []).append(max(val.values()))
        if 1.0 in val:
            default_weight.setdefault(key, []).append(val[1.0])

    def mean_at(table, method, density):
        per_family = [
            statistics.mean(v) for (m, d, _), v in table.items() if m == method and d == density
        ]
        if not per_family and density is not None:
            return mean_at(table, method, None)  # a method without density
        return statistics.mean(per_family)

    densities = results["densities"]
    methods = dict.fromkeys(m for m, _, _ in best_weight)
    baselines = [m for m in methods if not m.startswith(("lrp", "circuit"))]  # mergekit's
    best = {d: max(mean_at(best_weight, m, d) for m in baselines) for d in densities}
    cells = {
        m: [mean_at(default_weight, m, d) for d in densities]
        for m in methods
        if m.startswith("lrp")
    }
    lines = [
        "| lrp setting | "
        + " | ".join(f"val {d}" for d in densities)
        + " | mean | mean at the swept weight | worst margin to best mergekit row |",
        "|---" * (len(densities) + 4) + "|",
    ]
    for m in sorted(cells, key=lambda m: -statistics.mean(cells[m])):
        swept = statistics.mean(mean_at(best_weight, m, d) for d in densities)
        margin = min(c - best[d] for c, d in zip(cells[m], densities, strict=True))
        lines.append(
            f"| {m} | "
            + " | ".join(f"{c:.3f}" for c in cells[m])
            + f" | {statistics.mean(cells[m]):.3f} | {swept:.3f} | {margin:+.3f} |"
        )
    lines.append(
        "| best mergekit row (swept weight) | "
        + " | ".join(f"{best[d]:.3f}" for d in densities)
        + " | | | |"
    )
    return lines


def markdown(results: dict) -> str:
    lines = [
        "Test-split kept fraction of each expert's answer-NLL improvement (1 = expert, "
        "0 = base), averaged over the merged experts and over the subsets of each kind; "
        f"families {', '.join(results['families'])}; each cell the mean over families "
        "(each family averaged over its subsets and merge seeds), [min, max] over families.",
    ]
    for name, rows in subset_kinds(results):
        lines += ["", f"**{name}**", "", *summary_table(rows, results["densities"])]
    if any(row["method"].startswith("lrp") for row in results["rows"]):
        lines += [
            "",
            "**lrp's settings on the validation split, at weight 1**",
            "",
            *validation_choice(results),
        ]
    lines += [
        "",
        "Per merge (test kept fraction per merged task at the chosen weight, exact match "
        "in parentheses; `others`: mean kept fraction on the tasks not merged):",
        "",
        "| family | subset | method | density | weight | per task | others | mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        test = row["test"][0]
        per_task = ", ".join(
            f"{t} {test[t]['kept']:.2f}"
            + (f" ({test[t]['exact_match']:.2f})" if test[t]["exact_match"] is not None else "")
            for t in row["subset"]
        )
        others = [test[t]["kept"] for t in test if t not in row["subset"]]
        others = f"{statistics.mean(others):.2f}" if others else "-"
        mean = statistics.mean(row["test_mean_kept"])
        lines.append(
            f"| {row['family']} | {'+'.join(row['subset'])} | {row['method']} | "
            f"{row['density']} | {row['weight']} | {per_task} | {others} | {mean:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = subset_kinds(results)
    densities = results["densities"]
    figure, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 5), squeeze=False)
    colours = [*plt.get_cmap("tab10").colors, "black", "goldenrod"]
    for axis, (name, rows) in zip(axes[0], kinds, strict=True):
        for index, (method, by_density) in enumerate(summarize(rows).items()):
            if "None" in by_density:
                axis.axhline(by_density["None"][0], linestyle=":", color="gray", label=method)
                continue
            style = "--" if ", " in method else "-"  # variant rows dashed
            colour = colours[index % len(colours)]
            means = [by_density[str(d)][0] for d in densities]
            width = 2.5 if method.startswith("lrp") else 1.2
            on_top = 3 if style == "-" and method.startswith("lrp") else 2  # main lrp rows
            axis.plot(
                densities,
                means,
                style,
                marker="o",
                color=colour,
                lw=width,
                zorder=on_top,
                label=method,
            )
            lows = [by_density[str(d)][1] for d in densities]
            highs = [by_density[str(d)][2] for d in densities]
            if any(h > lo for h, lo in zip(highs, lows, strict=True)):
                axis.fill_between(densities, lows, highs, alpha=0.2, color=colour)
        axis.set_xlabel("density")
        axis.set_ylabel("kept fraction of expert improvement (test)")
        axis.set_ylim(-0.2, 1.0)
        axis.set_title(
            f"{name}; {len(results['families'])} families; values below -0.2 clipped",
            fontsize=10,
        )
        axis.legend(fontsize=7, ncol=2, loc="lower right")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="all experts of each family, 4 methods, density 0.5, one merge seed, 32"
        " calibration prompts (a smoke run of the protocol, under 5 min with families cached)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="NAME[:SEED]",
        help="toy families (presets, docs/toy-family.md); default: every accepted one",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run the lrp variant rows (target, consensus, calibration)",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="also run lrp's selection and sign rules and Circuit-Merge, one row each",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the importance-signal ablation instead: the same lrp selection with random, "
        "|delta|, gradient, fisher, activation and attnlrp scores (docs/BENCHMARKS.md)",
    )
    parser.add_argument("--no-exact", action="store_true", help="skip exact-match decoding")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these rows, by table name (e.g. 'lrp (delta)' ties)",
    )
    parser.add_argument(
        "--subsets",
        choices=("both", "pairs", "all"),
        default="both",
        help="merge every pair of experts, all experts together, or both",
    )
    parser.add_argument("--out", default="bench-out/quality")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="merge-and-evaluate processes (the threads are divided among them)",
    )
    args = parser.parse_args()
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

"""One job per table cell on one family, run over a process pool.

Every finished row is saved to ``rows.partial.json`` in the output directory at once, and
a run started again with the same output directory skips the jobs whose rows are there.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.evaluation import evaluate, subset_mean, subset_worst
from harness.methods import Method, merge_config, runs_of, weights_for
from harness.score_sets import family_score_files

PARTIAL = "rows.partial.json"


def family_id(family) -> str:
    return f"{family.preset}:{family.seed}"


def subsets_of(tasks, which: str = "both") -> list[tuple[str, ...]]:
    """The merged subsets of ``tasks``: every pair, all of them, or both."""
    everything = [tuple(tasks)]
    pairs = [p for p in itertools.combinations(tasks, 2) if p != everything[0]]
    # with two tasks the only pair is all experts: it is listed once, as all experts
    return {"pairs": pairs, "all": everything, "both": pairs + everything}[which]


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
        runs = len(runs_of(self.subset, self.method))
        return len(weights_for(self.subset, self.method)) * runs


def row_key(row: dict) -> tuple:
    """The :attr:`Job.key` a finished row belongs to."""
    return (row["family"], tuple(row["subset"]), row["method"], row["density"])


def family_jobs(family, methods, densities, subsets: str, progress) -> list[Job]:
    """Score the experts (cached) and list every cell of ``methods`` on ``family``."""
    score_files = family_score_files(family, methods, progress)
    family = type(family)(root=family.root, preset=family.preset, seed=family.seed)  # picklable
    return [
        Job(family, subset, method, density, score_files)
        for subset in subsets_of(family.tasks, subsets)
        for method in methods
        for density in (densities if method.uses_density else (None,))
    ]


def merge_row(job: Job, exact: bool) -> dict:
    """Merge the cell at each weight, merge seed and list order (:func:`runs_of`);
    choose the weight on the validation split (mean kept fraction of the merged tasks over
    seeds and orders), then score the test split at it, every seed and order, on the
    merges the choice was made on (kept until a better weight replaces them)."""
    from harness.merge import (
        configuration,
        exact_ranks,
        run_merge,
        scratch_dir,
        sparsification_reused,
    )

    family, subset, method, density = job.family, job.subset, job.method, job.density
    runs = runs_of(subset, method)

    def merged(weight, seed, index) -> Path:
        out = scratch / f"merged-{weight}-{index}"
        order = runs[index][1]
        config = merge_config(family, order, method, density, weight, job.score_files, seed)
        with exact_ranks(method.exact_ranks):
            run_merge(configuration(config), out, seed, getattr(family, "lora_cache", None))
        return out

    # the weight is chosen on the merged tasks only; the test split scores all the toy
    # family's tasks, and the real family's merged skills (the others are the base's)
    test_tasks = subset if getattr(family, "real", False) else None
    scratch = scratch_dir("bench-quality-")
    try:
        val_runs, val, chosen, kept = {}, {}, None, []
        with sparsification_reused():  # every weight sparsifies the same task vectors
            for weight in weights_for(subset, method):
                outs = [merged(weight, seed, i) for i, (seed, _) in enumerate(runs)]
                val_runs[weight] = [
                    run_record(evaluate(out, family, "val", False, subset), subset, s, o)
                    for out, (s, o) in zip(outs, runs, strict=True)
                ]
                val[weight] = statistics.mean(r["mean"] for r in val_runs[weight])
                if chosen is None or (val[weight], -weight) > (val[chosen], -chosen):
                    chosen, (kept, outs) = weight, (outs, kept)
                for out in outs:  # the merges of the weight that lost
                    shutil.rmtree(out)
        tests = [evaluate(out, family, "test", exact, test_tasks) for out in kept]
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
        "val_runs": val_runs,
        "test": tests,
        "test_runs": [run_record(t, subset, s, o) for t, (s, o) in zip(tests, runs, strict=True)],
        "test_mean_kept": [subset_mean(t, subset) for t in tests],
    }


def run_record(metrics: dict, subset, seed, order) -> dict:
    """One merge's summary: its seed and order, the merged tasks' kept fractions, their
    mean and worst, and the text retention (None without text); on the real family also
    the text NLL's change from the base and the general set's scores (test split)."""
    record = {
        "seed": seed,
        "order": list(order),
        "kept": {t: metrics[t]["kept"] for t in subset},
        "mean": subset_mean(metrics, subset),
        "worst": subset_worst(metrics, subset),
        "retention": metrics.get("text", {}).get("retention"),
    }
    if "delta" in metrics.get("text", {}):
        record["text_delta"] = metrics["text"]["delta"]
    if "general" in metrics:
        record["general"] = metrics["general"]
    return record


def run_jobs(
    jobs: list, out: Path, workers: int, threads: int, exact: bool, work=None
) -> list[dict]:
    """The rows of ``jobs``, in their order: those saved in ``out`` by an earlier run, and
    the others computed over ``workers`` processes (the ``threads`` divided among them) by
    ``work(job, exact)`` (default :func:`merge_row`; any job with ``key`` and ``merges``
    whose rows :func:`row_key` reads back)."""
    work = work or merge_row
    from tqdm import tqdm

    rows = load_partial(out)
    done = {row_key(r) for r in rows}
    todo = [job for job in jobs if job.key not in done]
    bar = tqdm(
        total=sum(j.merges for j in jobs),
        initial=sum(j.merges for j in jobs if j.key in done),
        unit="merge",
        desc="merges",
        file=sys.stderr,
    )

    def finished(job: Job, row: dict) -> None:
        rows.append(row)
        bar.update(job.merges)
        save_partial(out, rows)

    try:
        if workers == 1:
            for job in todo:
                finished(job, work(job, exact))
        else:
            context = multiprocessing.get_context("spawn")  # no fork after OpenMP started
            with ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_start_worker,
                initargs=(max(1, threads // workers),),
            ) as pool:
                running = {pool.submit(work, job, exact): job for job in todo}
                for future in as_completed(running):
                    finished(running[future], future.result())
    finally:
        bar.close()
    # the saved file may hold rows of later jobs (a resumed run): only these jobs' rows
    order = {job.key: index for index, job in enumerate(jobs)}
    return sorted((r for r in rows if row_key(r) in order), key=lambda r: order[row_key(r)])


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def load_partial(out: Path) -> list[dict]:
    partial = Path(out) / PARTIAL
    return json.loads(partial.read_text()) if partial.exists() else []


def save_partial(out: Path, rows: list[dict]) -> None:
    """Write the finished rows atomically (an interrupted write leaves the previous file)."""
    partial = Path(out) / PARTIAL
    partial.with_suffix(".tmp").write_text(json.dumps(rows))
    partial.with_suffix(".tmp").replace(partial)

"""One run of the quality benchmark: build the families, merge every cell, write the
results (results.json, results.md, results.png)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.jobs import PARTIAL, family_id, family_jobs, run_jobs
from harness.methods import Method
from harness.plots import plot
from harness.quality_report import markdown, per_family_tables


@dataclass(frozen=True)
class Settings:
    """What a run merges (families, rows, densities, subsets) and how (processes)."""

    families: list[tuple[str, int]]  # (preset, seed)
    methods: list[Method]
    densities: tuple[float, ...]
    out: Path
    cache: Path
    subsets: str = "both"  # "pairs", "all" or "both"; --quick merges all experts only
    quick: bool = False
    exact: bool = True  # exact match of greedy answers on the test split
    threads: int = 2
    workers: int = 2


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


def run(settings: Settings) -> dict:
    """Every cell of ``settings`` on every family (resuming from ``settings.out``)."""
    from toy_family import build_family

    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    families = [
        build_family(settings.cache, preset=preset, seed=seed, progress=True)
        for preset, seed in settings.families
    ]
    subsets = "all" if settings.quick else settings.subsets
    jobs = [
        job
        for family in families
        for job in family_jobs(family, settings.methods, settings.densities, subsets, print)
    ]
    rows = run_jobs(jobs, settings.out, settings.workers, settings.threads, settings.exact)
    return {
        "quick": settings.quick,
        "families": [family_id(f) for f in families],
        "family_roots": {family_id(f): str(f.root) for f in families},
        "architectures": {family_id(f): f.recipe.architecture for f in families},
        "tasks": {family_id(f): list(f.tasks) for f in families},
        "subsets": settings.subsets,
        "densities": list(settings.densities),
        "methods": [m.name for m in settings.methods],
        "rows": rows,
        "per_family": {
            family_id(f): per_family_tables(
                [r for r in rows if r["family"] == family_id(f)], f.tasks
            )
            for f in families
        },
        "seconds": time.perf_counter() - started,
        "workers": settings.workers,
    }


def write(results: dict, out: Path) -> str:
    """Write results.json, results.md and results.png into ``out``, drop the saved
    partial rows; return the markdown."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / PARTIAL).unlink(missing_ok=True)
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot(results, out / "results.png")
    return table

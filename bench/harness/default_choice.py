"""Choosing one default per merge method: the objective and the candidates, fixed before
any candidate was run (``scripts/choose_defaults.py`` runs them).

Every candidate is a complete setting a user gets without writing a parameter: no
per-model weight sweep, one setting for every number of fine-tunes. Each is merged on the
validation split of every cell, a cell being one merged set of experts (the real family's
four full fine-tunes, each of their six pairs, its LoRA pair; a toy family's pairs and
all its experts), and scored there by

    cell score = 0.4 × mean kept + 0.4 × worst expert + 0.2 × base kept,
    base kept  = clip(1 − ΔNLL / 0.1 nats, −1, 1),

ΔNLL the merged model's held-out text NLL (validation windows) minus the base's: 1 is the
base's text ability, 0 a loss of 0.1 nats per token (a 10 % rise in perplexity). The
general-question set is not used: it has no validation half, and it is the test figure
the choice is reported on.

**The floor.** In every cell a candidate may lose at most :data:`FLOOR_SLACK` nats of
text more than task arithmetic loses there at its best weight (the weight of {1/N, 0.5,
1} with the best validation mean kept, the benchmark's rule for mergekit's rows).

**The choice.** A method's score is the mean over sizes of the mean cell score within a
size (the real family's four experts, its pairs, its LoRA pair; each toy family's pairs
and all experts), so six pairs count as much as one four-expert merge. The default is the
best-scoring candidate that passes the floor in every cell; if none does, the one that
fails it in the fewest cells, then by the smallest excess over the floor.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass, field

WEIGHTS = {"mean": 0.4, "worst": 0.4, "base": 0.2}
#: nats of text NLL per token at which base kept reaches 0
TEXT_SCALE = 0.1
#: nats by which a candidate may exceed task arithmetic's text loss in a cell
FLOOR_SLACK = 0.01


@dataclass(frozen=True)
class Candidate:
    """A complete setting of a merge method (global parameters, one per-model weight)."""

    name: str
    merge_method: str
    params: dict = field(default_factory=dict)
    density: float | None = None
    #: the per-model weight; several only for the floor's reference, task arithmetic
    weights: tuple = (1.0,)
    #: score-set key of the files it reads (``harness.score_sets``), None for none
    scores: str | None = None
    #: the weight of the base's own file of the same kind (``base_scores``), None: none
    base_weight: float | None = None


def _lrp(name: str, importance: str, density: float, consensus: str, normalize: bool, **kw):
    params = {"importance": importance, "consensus": consensus, "normalize": normalize}
    return Candidate(f"lrp ({name})", "lrp", params, density, scores="attnlrp", **kw)


#: lrp: the current defaults, the disjoint mean (TIES' normalize) with and without TIES'
#: sign election at two densities, a smaller top-k, the defaults at weight 0.5, and the
#: same rules ranked by |delta| instead of |theta| x relevance
LRP = [
    _lrp("weight 0.5, none", "weight", 0.5, "none", False),
    _lrp("weight 0.5, none, normalize", "weight", 0.5, "none", True),
    _lrp("weight 0.9, none, normalize", "weight", 0.9, "none", True),
    _lrp("weight 0.5, sum, normalize", "weight", 0.5, "sum", True),
    _lrp("weight 0.9, sum, normalize", "weight", 0.9, "sum", True),
    _lrp("weight 0.2, none", "weight", 0.2, "none", False),
    _lrp("weight 0.5, none, model weight 0.5", "weight", 0.5, "none", False, weights=(0.5,)),
    _lrp("delta 0.5, none, normalize", "delta", 0.5, "none", True),
    _lrp("delta 0.9, sum, normalize", "delta", 0.9, "sum", True),
]
#: regmean: the current defaults (alpha 0.9, ridge 1e-4), alpha 1 (the plain solve), a
#: larger ridge, and the base's Gram file as one more member at weights 1 and 4 (these two
#: were added after the first run, which had left out the base-holding rows)
REGMEAN = [
    Candidate("regmean (alpha 0.9)", "regmean", {"alpha": 0.9}, scores="gram"),
    Candidate("regmean (alpha 1.0)", "regmean", {"alpha": 1.0}, scores="gram"),
    Candidate(
        "regmean (alpha 0.9, ridge 0.01)", "regmean", {"alpha": 0.9, "ridge": 0.01}, scores="gram"
    ),
    *(
        Candidate(f"regmean (alpha 0.9, base_weight {w:g})", "regmean", {"alpha": 0.9},
                  scores="gram", base_weight=w)  # fmt: skip
        for w in (1.0, 4.0)
    ),
]
#: the floor's reference
TASK_ARITHMETIC = Candidate("task_arithmetic", "task_arithmetic")
CANDIDATES = [*LRP, *REGMEAN]


def weights_of(candidate: Candidate, merged: int) -> tuple:
    """The per-model weights ``candidate`` merges ``merged`` experts at (task
    arithmetic: the benchmark's sweep, ``harness.methods.weights_for``)."""
    from harness.methods import weights_for

    if candidate == TASK_ARITHMETIC:  # by value: a worker process gets a copy
        return tuple(weights_for(range(merged), as_method(candidate, None)))
    return candidate.weights


def base_kept(text_delta: float) -> float:
    return max(-1.0, min(1.0, 1.0 - text_delta / TEXT_SCALE))


def cell_score(record: dict) -> float:
    """One cell's score from its validation record (``mean``, ``worst``, ``text_delta``)."""
    return (
        WEIGHTS["mean"] * record["mean"]
        + WEIGHTS["worst"] * record["worst"]
        + WEIGHTS["base"] * base_kept(record["text_delta"])
    )


def at_best_weight(reference: dict) -> dict:
    """Task arithmetic's record at its best validation weight (``reference``: weight ->
    record; the best mean kept, the smaller weight on a tie)."""
    return reference[max(reference, key=lambda w: (reference[w]["mean"], -w))]


def floor_of(reference: dict) -> float:
    """The text loss a cell allows: task arithmetic's at its best validation weight,
    plus :data:`FLOOR_SLACK`."""
    return at_best_weight(reference)["text_delta"] + FLOOR_SLACK


def rank(records: dict, references: dict) -> list[dict]:
    """Every candidate's standing, best first. ``records``: candidate name -> {(size,
    cell): record}; ``references``: {(size, cell): {weight: record}} (task arithmetic)."""
    standings = []
    for name, cells in records.items():
        by_size: dict = {}
        failures, excess = 0, 0.0
        for (size, cell), record in cells.items():
            by_size.setdefault(size, []).append(cell_score(record))
            over = record["text_delta"] - floor_of(references[(size, cell)])
            if over > 0:
                failures, excess = failures + 1, excess + over
        standings.append(
            {
                "name": name,
                "score": statistics.mean(statistics.mean(v) for v in by_size.values()),
                "per_size": {s: statistics.mean(v) for s, v in by_size.items()},
                "floor_failures": failures,
                "cells": len(cells),
                "excess": excess,
            }
        )
    return sorted(standings, key=lambda s: (s["floor_failures"], s["excess"], -s["score"]))


@dataclass(frozen=True)
class ChoiceJob:
    """One candidate on one cell: merged at each of its weights, scored on validation."""

    family: object  # toy_family.Family or real_family.RealFamily
    subset: tuple
    candidate: Candidate
    scores: str | None  # the score-set key of the files it reads
    score_files: dict  # (score-set key, task or "base") -> file
    size: str  # the size the cell counts under (:func:`rank`)

    @property
    def key(self) -> tuple:
        from harness.jobs import family_id

        return (family_id(self.family), self.subset, self.candidate.name, self.candidate.density)

    @property
    def merges(self) -> int:
        return len(weights_of(self.candidate, len(self.subset)))


def as_method(candidate: Candidate, scores: str | None):
    """The harness row that merges ``candidate`` (``scores``: its score-set key)."""
    from harness.methods import Method

    return Method(
        candidate.name,
        candidate.merge_method,
        dict(candidate.params),
        scores=scores,
        uses_density=candidate.density is not None,
        pinned=False,
        base_weight=candidate.base_weight,
    )


def validate(job: ChoiceJob, exact: bool = False) -> dict:
    """The job's row: per weight, the validation record of its one merge (kept fractions,
    their mean and worst, the text NLL's change from the base)."""
    from harness.evaluation import evaluate, reference_text, subset_mean, subset_worst
    from harness.jobs import family_id
    from harness.merge import configuration, run_merge, scratch_dir
    from harness.methods import merge_config

    family, subset, candidate = job.family, job.subset, job.candidate
    method = as_method(candidate, job.scores)
    real = getattr(family, "real", False)
    records = {}
    scratch = scratch_dir("choose-defaults-")
    try:
        for weight in weights_of(candidate, len(subset)):
            out = scratch / f"merged-{weight}"
            config = merge_config(
                family, subset, method, candidate.density, weight, job.score_files
            )
            run_merge(configuration(config), out, None, getattr(family, "lora_cache", None))
            metrics = evaluate(out, family, "val", False, subset, text=True)
            if real:
                delta = metrics["text"]["delta"]
            else:
                delta = metrics["text"]["nll"] - reference_text(family, "val")["base"]
            records[weight] = {
                "kept": {t: metrics[t]["kept"] for t in subset},
                "mean": subset_mean(metrics, subset),
                "worst": subset_worst(metrics, subset),
                "text_delta": delta,
            }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "family": family_id(family),
        "subset": list(subset),
        "method": candidate.name,
        "density": candidate.density,
        "size": job.size,
        "records": {str(w): r for w, r in records.items()},
    }

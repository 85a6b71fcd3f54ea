"""The quality benchmark on the real family (SmolLM2-135M-Instruct fine-tunes): its rows,
its jobs and its tables.

Every row runs through the same harness as on the toy families (``harness.jobs``: real
``mergekit`` merges, the weight chosen on the validation split); what differs is the row
set and the densities each row is run at, chosen for a 135M model on two cores:

* ``lrp`` at its defaults and its controls at the same rule, density and weight (the
  importance ranked by |Δ| instead of |θ|; uniformly random scores in its place;
  the AttnLRP scores replaced by activation, gradient or Fisher scores);
* ``regmean`` and ``circuit`` at their defaults;
* mergekit's task arithmetic, TIES, DARE-TIES, DELLA and Breadcrumbs-TIES at each of
  :data:`MERGEKIT_DENSITIES` and each weight of ``harness.methods.weights_for``; the
  table reports each at its best density on the validation split;
* the published peers mergekit lacks (``harness.methods.PEERS``: TSV-M, Iso-C, WUDI).

Pairs of fine-tunes and the LoRA adapters run :data:`SMALL_ROWS`: every row but the
controls (an ablation of the four-expert merge) and lrp's defaults at one merge seed,
with each mergekit method at the density
it scored best at on the four experts' validation split (:func:`chosen_densities`), to
bound the full table's time (106.9 min on two cores with the peers, docs/BENCHMARKS.md).

Score files come from 32 calibration chats per expert (the Roman-numeral skill has 38
distinct calibration questions).
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from harness.jobs import Job, subsets_of
from harness.methods import BY_NAME, PEERS, Method, gram_scores
from harness.score_sets import family_score_files
from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY

PROMPTS = 32
SCORES = f"predicted-{PROMPTS}"
MERGEKIT_DENSITIES = (0.3, 0.6, 0.9)


def _control(label: str, params: dict, scores: str) -> Method:
    """lrp's default rule at its default density and weight 1, one thing changed (not
    pinned: the rest is whatever the defaults are)."""
    return Method(
        f"lrp (defaults, {label})", "lrp", params, scores=scores, uses_weight=False, pinned=False
    )


DEFAULTS = replace(BY_NAME["lrp (defaults)"], scores=SCORES)
CONTROLS = [
    _control("|delta| importance", {"importance": "delta"}, SCORES),
    _control("random scores", {"importance": "scores"}, "random-0"),
    _control("activation scores", {"importance": "weight"}, f"activation:{SCORES}"),
    _control("gradient scores", {"importance": "weight"}, f"gradient:{SCORES}"),
    _control("fisher scores", {"importance": "weight"}, f"fisher:{SCORES}"),
]
REGMEAN = Method(
    "regmean (defaults)",
    "regmean",
    scores=gram_scores().replace("-128", f"-{PROMPTS}"),
    uses_density=False,
    uses_weight=False,
)
CIRCUIT = Method("circuit (defaults)", "circuit", seeds=(0,), uses_density=False, uses_weight=False)
MERGEKIT = [
    BY_NAME["task_arithmetic"],
    BY_NAME["ties"],
    replace(BY_NAME["dare_ties"], seeds=(0,)),
    replace(BY_NAME["della"], seeds=(0,)),
    BY_NAME["breadcrumbs_ties"],
]
#: the recommended config (docs/BENCHMARKS.md, "Choosing the defaults"): the task vectors
#: averaged, mergekit's task arithmetic with normalize (weight 1/N, whatever N)
AVERAGED = Method(
    "task_arithmetic (averaged: recommended)", "task_arithmetic", {"normalize": True},
    uses_density=False,
)
ROWS = [DEFAULTS, *CONTROLS, REGMEAN, CIRCUIT, AVERAGED, *MERGEKIT, *PEERS]
#: the rows on pairs and on the LoRA adapters (lrp's defaults at one merge seed: the
#: spread over seeds is measured on the four experts)
SMALL_ROWS = [replace(DEFAULTS, seeds=(0,)), REGMEAN, CIRCUIT, AVERAGED, *MERGEKIT, *PEERS]
#: the --quick row set: all four full fine-tunes, one density for mergekit's methods
QUICK_ROWS = [DEFAULTS, REGMEAN, *MERGEKIT[:3]]
QUICK_DENSITY = 0.6
BY_ROW = {m.name: m for m in ROWS}


def densities_of(method: Method, quick: bool, chosen: dict | None = None) -> tuple:
    """The densities ``method`` runs at: lrp's own; a mergekit method's density chosen
    on the four experts (``chosen``) when given, else the sweep (one density ``quick``)."""
    if not method.uses_density:
        return (None,)
    if method.merge_method == "lrp":
        return (DEFAULT_DENSITY,)
    if chosen is not None:
        return (chosen[method.name],)
    return (QUICK_DENSITY,) if quick else MERGEKIT_DENSITIES


def real_jobs(family, methods, subsets: str, quick: bool, progress, chosen=None) -> list[Job]:
    """Score the experts (cached) and list every cell of ``methods`` on ``family``."""
    score_files = family_score_files(family, methods, progress)
    family = replace(family)  # without its cached tokenizer: workers load their own
    return [
        Job(family, subset, method, density, score_files)
        for subset in subsets_of(family.tasks, subsets)
        for method in methods
        for density in densities_of(method, quick, chosen)
    ]


def chosen_densities(rows: list[dict]) -> dict[str, float]:
    """Each mergekit method's density at its best validation score in ``rows``."""
    mergekit = {m.name for m in MERGEKIT if m.uses_density}
    return {r["method"]: r["density"] for r in best_rows(rows) if r["method"] in mergekit}


def best_rows(rows: list[dict]) -> list[dict]:
    """Per (subset, method): the row whose chosen weight scored best on validation."""
    best: dict = {}
    for row in rows:
        key = (tuple(row["subset"]), row["method"])
        score = max(row["val_mean_kept"].values())
        if key not in best or score > max(best[key]["val_mean_kept"].values()):
            best[key] = row
    return list(best.values())


def summary(row: dict) -> dict:
    """A row's test figures, averaged over its merges (seeds, orders)."""
    runs, tests = row["test_runs"], row["test"]
    subset = row["subset"]
    mean = statistics.mean
    return {
        "mean": mean([r["mean"] for r in runs]),
        "worst": mean([r["worst"] for r in runs]),
        "exact_match": {t: mean([m[t]["exact_match"] for m in tests]) for t in subset},
        "text_delta": mean([r["text_delta"] for r in runs]),
        "general_em": mean([r["general"]["exact_match"] for r in runs]),
        "general_correct": mean([r["general"]["correct"] for r in runs]),
    }


def cell(text: str) -> str:
    """``text`` inside a markdown table cell (its bars escaped)."""
    return text.replace("|", "\\|")


def table(rows: list[dict], reference: dict, subset) -> list[str]:
    """Markdown: one line per method on ``subset``, at its validation-chosen density and
    weight; the base, the experts and the multi-task model first."""
    subset = list(subset)
    head = (
        "| model | density | weight | mean kept | worst | "
        + " | ".join(f"{t} EM" for t in subset)
        + " | text ΔNLL | general EM | general correct |"
    )
    lines = [head, "|---" * (8 + len(subset)) + "|"]
    for name, metrics in reference.items():
        if name.startswith("expert-") and name.removeprefix("expert-") not in subset:
            continue
        ems = " | ".join(f"{metrics[t]['exact_match']:.2f}" for t in subset)
        delta = metrics["text"]["nll"] - reference["base"]["text"]["nll"]
        general = metrics.get("general", {})
        lines.append(
            f"| *{name}* | | | | | {ems} | {delta:+.3f} | "
            f"{general.get('exact_match', float('nan')):.2f} | "
            f"{general.get('correct', float('nan')):.2f} |"
        )
    for row in best_rows([r for r in rows if r["subset"] == subset]):
        s = summary(row)
        density = "" if row["density"] is None else f"{row['density']:g}"
        ems = " | ".join(f"{s['exact_match'][t]:.2f}" for t in subset)
        lines.append(
            f"| {cell(row['method'])} | {density} | {row['weight']:g} | {s['mean']:.3f} | "
            f"{s['worst']:.3f} | {ems} | {s['text_delta']:+.3f} | {s['general_em']:.2f} | "
            f"{s['general_correct']:.2f} |"
        )
    return lines


def pairs_table(rows: list[dict], pairs: list[tuple]) -> list[str]:
    """Markdown: per method, its test figures averaged over ``pairs`` (each pair at its
    own validation-chosen weight), and the lowest worst expert of any pair."""
    found: dict[str, list[dict]] = {}
    for pair in pairs:
        for row in best_rows([r for r in rows if r["subset"] == list(pair)]):
            found.setdefault(row["method"], []).append(summary(row))
    lines = [
        "| method | pairs | mean kept | worst (mean) | worst (lowest) | text ΔNLL | "
        "general EM | general correct |",
        "|---" * 8 + "|",
    ]
    mean = statistics.mean
    for method, found_rows in found.items():
        lines.append(
            f"| {cell(method)} | {len(found_rows)} | {mean(s['mean'] for s in found_rows):.3f} | "
            f"{mean(s['worst'] for s in found_rows):.3f} | "
            f"{min(s['worst'] for s in found_rows):.3f} | "
            f"{mean(s['text_delta'] for s in found_rows):+.3f} | "
            f"{mean(s['general_em'] for s in found_rows):.2f} | "
            f"{mean(s['general_correct'] for s in found_rows):.2f} |"
        )
    return lines

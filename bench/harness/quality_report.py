"""The quality tables: each cell the mean over families of the family's value, with the
[min, max] over families; lrp's settings ranked on the validation split; one row per merge."""

from __future__ import annotations

import functools
import json
import statistics
from pathlib import Path

from harness.methods import BY_NAME, LRP, LRP_VARIANT, RANK_CHECK, REFERENCE


def is_lrp(method: str) -> bool:
    """Whether the row named ``method`` is one of lrp's settings (main row or variant)."""
    return BY_NAME[method].role in (LRP, LRP_VARIANT)


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
    the weight the sweep chose, and the margin to the best reference row (mergekit's
    methods, or the ablation's signals) at each density (that row at its chosen weight)."""
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
    references = [m for m in methods if BY_NAME[m].role == REFERENCE]
    best = {d: max(mean_at(best_weight, m, d) for m in references) for d in densities}
    cells = {m: [mean_at(default_weight, m, d) for d in densities] for m in methods if is_lrp(m)}
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


#: the objective lrp's defaults are chosen by, on the validation split at weight 1, fixed
#: before any test number was looked at: per family 0.4 × the mean kept fraction + 0.4 ×
#: the worst expert's + 0.2 × text retention (clipped to [-1, 1]; a family without
#: retention counts its mean kept fraction there), then the mean over families
OBJECTIVE = {"mean": 0.4, "worst": 0.4, "retention": 0.2}


def run_summary(records: list[dict]) -> dict:
    """Over a cell's merges (seeds and orders): each expert's mean kept fraction, their
    mean, the worst expert (of the per-expert means), the mean retention, the spread over
    list orders (max - min of the per-order mean; 0 with one order) and the worst expert
    in the list order where it is worst (what a user listing the models that way gets;
    the same as the worst expert for a rule that does not depend on the order)."""
    experts = list(records[0]["kept"])
    per_expert = {t: statistics.mean(r["kept"][t] for r in records) for t in experts}
    by_order: dict = {}
    for record in records:
        by_order.setdefault(tuple(record["order"]), []).append(record)
    order_means = [statistics.mean(r["mean"] for r in v) for v in by_order.values()]
    order_worst = [
        min(statistics.mean(r["kept"][t] for r in v) for t in experts) for v in by_order.values()
    ]
    retentions = [r["retention"] for r in records if r["retention"] is not None]
    return {
        "per_expert": per_expert,
        "mean": statistics.mean(per_expert.values()),
        "worst": min(per_expert.values()),
        "retention": statistics.mean(retentions) if retentions else None,
        "order_spread": max(order_means) - min(order_means),
        "worst_in_worst_order": min(order_worst),
        "orders": len(order_means),
    }


def objective(summary: dict) -> float:
    retention = summary["retention"]
    retention = summary["mean"] if retention is None else max(-1.0, min(1.0, retention))
    return (
        OBJECTIVE["mean"] * summary["mean"]
        + OBJECTIVE["worst"] * summary["worst"]
        + OBJECTIVE["retention"] * retention
    )


def text_change(results: dict, row: dict) -> float | None:
    """A cell's held-out text NLL over its test merges minus the base's (nats per token:
    0 = the base's text ability, above 0 worse), from the base's NLL the family caches;
    None without text. Reported beside retention, which is undefined where no expert
    loses text ability to measure it against."""
    texts = [t.get("text") for t in row.get("test", [])]
    root = results.get("family_roots", {}).get(row["family"])
    if not texts or None in texts or root is None:
        return None
    base = _base_text_nll(root)
    return None if base is None else statistics.mean(t["nll"] for t in texts) - base


@functools.cache
def _base_text_nll(root: str) -> float | None:
    """The base's held-out text NLL on the test split, as the family caches it (read once
    per family, not once per row)."""
    path = Path(root) / "metrics" / "reference-text-test.json"
    return json.loads(path.read_text())["base"] if path.exists() else None


def test_runs_by_cell(results: dict) -> dict:
    """(family, method, density) -> the test runs of that all-experts cell."""
    return {
        (row["family"], row["method"], row["density"]): row["test_runs"]
        for row in all_experts_rows(results)
        if row.get("test_runs")
    }


def all_experts_rows(results: dict) -> list[dict]:
    everything = {f: set(t) for f, t in results["tasks"].items()}
    return [r for r in results["rows"] if set(r["subset"]) == everything[r["family"]]]


def expert_tables(results: dict) -> list[str]:
    """Per family, each all-experts row on the test split: every expert's kept fraction,
    the mean, the worst expert, text retention, the spread over list orders."""
    lines = []
    rows = all_experts_rows(results)
    for family, tasks in results["tasks"].items():
        mine = [r for r in rows if r["family"] == family and r.get("test_runs")]
        if not mine:
            continue
        lines += [
            "",
            f"**{family}** ({results['architectures'][family]}, {len(tasks)} experts; test "
            "split, mean over merge seeds and list orders)",
            "",
            "| method | density | weight | " + " | ".join(tasks)
            + " | mean | worst | retention | text ΔNLL | order spread (orders) |",
            "|---|---|---|" + "---|" * (len(tasks) + 5),
        ]
        for row in mine:
            summary = run_summary(row["test_runs"])
            cells = " | ".join(f"{summary['per_expert'][t]:.3f}" for t in tasks)
            lines.append(
                f"| {row['method']} | {row['density']} | {row['weight']} | {cells} | "
                f"{summary['mean']:.3f} | {summary['worst']:.3f} | "
                f"{_fmt(summary['retention'])} | {_fmt(text_change(results, row), '+.4f')} | "
                f"{summary['order_spread']:.3f} ({summary['orders']}) |"
            )
    return lines


def overview_table(results: dict) -> list[str]:
    """Each all-experts row and density over families (test split): the mean kept
    fraction, the worst expert, retention (means over families, [min, max]) and the
    largest order spread."""
    cells: dict = {}
    for row in all_experts_rows(results):
        if not row.get("test_runs"):
            continue
        summary = {**run_summary(row["test_runs"]), "text": text_change(results, row)}
        cells.setdefault((row["method"], row["density"]), []).append(summary)
    lines = [
        "| method | density | mean kept | worst expert | worst expert, worst order | "
        "retention | text ΔNLL | max order spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, density), summaries in cells.items():
        retentions = [s["retention"] for s in summaries if s["retention"] is not None]
        texts = [s["text"] for s in summaries if s["text"] is not None]
        lines.append(
            f"| {method} | {density} | {_spread([s['mean'] for s in summaries])} | "
            f"{_spread([s['worst'] for s in summaries])} | "
            f"{_spread([s['worst_in_worst_order'] for s in summaries])} | "
            f"{_spread(retentions) if retentions else '-'} | "
            f"{_fmt(statistics.mean(texts) if texts else None, '+.4f')} | "
            f"{max(s['order_spread'] for s in summaries):.3f} |"
        )
    return lines


def defaults_choice(results: dict) -> list[str]:
    """lrp's settings (and every other row, for reference) ranked by :data:`OBJECTIVE` on
    the validation split at weight 1 (lrp's default weight: a default is used without a
    sweep; mergekit's rows at their best weight), all-experts merges, mean over families."""
    scores: dict = {}
    for row in all_experts_rows(results):
        runs = row.get("val_runs")
        if not runs:
            continue
        lrp = is_lrp(row["method"])
        weights = {float(w): records for w, records in runs.items()}
        if lrp and 1.0 in weights:
            value, weight = objective(run_summary(weights[1.0])), 1.0
        else:
            value, weight = max((objective(run_summary(r)), w) for w, r in weights.items())
        key = (row["method"], row["density"])
        scores.setdefault(key, []).append((value, weight, run_summary(weights[weight])))
    ranked = sorted(scores.items(), key=lambda item: -statistics.mean(v for v, _, _ in item[1]))
    lines = [
        "| method | density | objective | mean kept | worst expert | retention | order "
        "spread | weight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, density), found in ranked:
        summaries = [s for _, _, s in found]
        retentions = [s["retention"] for s in summaries if s["retention"] is not None]
        weights = sorted({w for _, w, _ in found})
        lines.append(
            f"| {method} | {density} | {statistics.mean(v for v, _, _ in found):.3f} | "
            f"{statistics.mean(s['mean'] for s in summaries):.3f} | "
            f"{statistics.mean(s['worst'] for s in summaries):.3f} | "
            f"{_fmt(statistics.mean(retentions) if retentions else None)} | "
            f"{max(s['order_spread'] for s in summaries):.3f} | "
            f"{', '.join(f'{w:g}' for w in weights)} |"
        )
    return lines


def ranks_table(results: dict) -> list[str]:
    """lrp's stochastic selection with approximate ranks against exact ranks (the two
    RANK_CHECK rows), all experts, test split: per family, density and expert, the exact version's
    [min, max] over merge seeds and the approximate version's mean over the same seeds,
    and whether that mean lies inside the exact version's seed range."""
    approx, exact = (m.name for m in RANK_CHECK)
    found = test_runs_by_cell(results)
    lines = [
        "| family | density | expert | exact ranks: [min, max] over seeds | approximate "
        "ranks: mean over seeds | inside |",
        "|---|---|---|---|---|---|",
    ]
    for (family, method, density), runs in found.items():
        reference = found.get((family, exact, density))
        if method != approx or reference is None:
            continue
        for expert in runs[0]["kept"]:
            values = [r["kept"][expert] for r in reference]
            mean = statistics.mean(r["kept"][expert] for r in runs)
            inside = min(values) <= mean <= max(values)
            lines.append(
                f"| {family} | {density} | {expert} | [{min(values):.3f}, {max(values):.3f}] | "
                f"{mean:.3f} | {'yes' if inside else 'no'} |"
            )
    return lines if len(lines) > 2 else []


#: the unit rule ranked by relevance mass and, as its control, by |delta| mass
UNIT_PAIRS = {
    "stochastic": (
        "lrp (delta, stochastic, unit, normalize)",
        "lrp (delta, stochastic, unit, |delta| mass, normalize)",
    ),
    "top-k": (
        "lrp (delta, topk, unit, normalize)",
        "lrp (delta, topk, unit, |delta| mass, normalize)",
    ),
}


def unit_mass_table(results: dict) -> list[str]:
    """What ranking the units by relevance mass instead of |delta| mass changes, all
    experts, test split: per selection and density, the difference of the mean kept
    fraction (relevance − |delta|) as the mean over families [min, max], and the range of
    the same difference merge seed by merge seed over all families."""
    found = test_runs_by_cell(results)
    lines = [
        "| selection | density | relevance mass − \\|Δ\\| mass: mean over families [min, max] "
        "| seed by seed [min, max] |",
        "|---|---|---|---|",
    ]
    for selection, (relevance, magnitude) in UNIT_PAIRS.items():
        for density in results["densities"]:
            by_family, by_seed = [], []
            for family in results["families"]:
                a = found.get((family, relevance, density))
                b = found.get((family, magnitude, density))
                if a is None or b is None:
                    continue
                by_family.append(
                    statistics.mean(r["mean"] for r in a) - statistics.mean(r["mean"] for r in b)
                )
                by_seed += [x["mean"] - y["mean"] for x, y in zip(a, b, strict=True)]
            if by_family:
                lines.append(
                    f"| {selection} | {density} | {statistics.mean(by_family):+.3f} "
                    f"[{min(by_family):+.3f}, {max(by_family):+.3f}] | "
                    f"[{min(by_seed):+.3f}, {max(by_seed):+.3f}] |"
                )
    return lines if len(lines) > 2 else []


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) == 1 or max(values) == min(values):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def merge_table(rows: list[dict]) -> list[str]:
    """One line per merge: test kept fraction per merged task, exact match, the others."""
    lines = [
        "| family | subset | method | density | weight | per task | others | mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        test = row["test"][0]
        per_task = ", ".join(
            f"{t} {test[t]['kept']:.2f}"
            + (f" ({test[t]['exact_match']:.2f})" if test[t]["exact_match"] is not None else "")
            for t in row["subset"]
        )
        others = [test[t]["kept"] for t in test if t not in row["subset"] and t != "text"]
        others = f"{statistics.mean(others):.2f}" if others else "-"
        mean = statistics.mean(row["test_mean_kept"])
        lines.append(
            f"| {row['family']} | {'+'.join(row['subset'])} | {row['method']} | "
            f"{row['density']} | {row['weight']} | {per_task} | {others} | {mean:.3f} |"
        )
    return lines


def markdown(results: dict) -> str:
    """The summary tables of each subset kind; lrp's settings ranked on the validation split
    when the run has lrp rows and rows to measure them against; one line per merge."""
    lines = [
        "Test-split kept fraction of each expert's answer-NLL improvement (1 = expert, "
        "0 = base), averaged over the merged experts and over the subsets of each kind; "
        f"families {', '.join(results['families'])}; each cell the mean over families "
        "(each family averaged over its subsets and merge seeds), [min, max] over families.",
    ]
    for name, rows in subset_kinds(results):
        lines += ["", f"**{name}**", "", *summary_table(rows, results["densities"])]
    if any(r.get("test_runs") for r in results["rows"]):
        lines += [
            "",
            "**All experts: the mean, the worst expert, text retention, list orders** (test "
            "split; each cell the mean over families [min, max]; order spread: the largest "
            "over families of max - min over list orders)",
            "",
            *overview_table(results),
            *expert_tables(results),
            "",
            "**Every row ranked by the defaults objective on the validation split** "
            f"({' + '.join(f'{w} x {k}' for k, w in OBJECTIVE.items())}; lrp's rows at "
            "weight 1, the others at their best weight; mean over families)",
            "",
            *defaults_choice(results),
        ]
    units = unit_mass_table(results)
    if units:
        lines += [
            "",
            "**The unit rule by relevance mass against |Δ| mass** (test split, all experts)",
            "",
            *units,
        ]
    ranks = ranks_table(results)
    if ranks:
        lines += [
            "",
            "**Approximate against exact ranks** (lrp's stochastic selection, priority, "
            "normalize, in the listed order, merge seeds 0-2; test split, all experts)",
            "",
            *ranks,
        ]
    methods = {row["method"] for row in results["rows"]}
    if any(map(is_lrp, methods)) and any(BY_NAME[m].role == REFERENCE for m in methods):
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
        *merge_table(results["rows"]),
    ]
    return "\n".join(lines) + "\n"

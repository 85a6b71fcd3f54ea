"""The quality tables: each cell the mean over families of the family's value, with the
[min, max] over families; lrp's settings ranked on the validation split; one row per merge."""

from __future__ import annotations

import statistics

from harness.methods import BY_NAME, LRP, LRP_VARIANT, REFERENCE


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
        others = [test[t]["kept"] for t in test if t not in row["subset"]]
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

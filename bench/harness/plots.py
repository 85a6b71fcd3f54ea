"""results.png: the summary tables as kept fraction against density, one panel per kind
of subset; each row's line style comes from its role (harness.methods)."""

from __future__ import annotations

from pathlib import Path

from harness.methods import BY_NAME, LRP, LRP_VARIANT
from harness.quality_report import subset_kinds, summarize


def line_style(method: str) -> dict:
    """matplotlib keywords of a row's line: lrp's rows bold (variants dashed, main rows on
    top), the others thin."""
    role = BY_NAME[method].role
    lrp = role in (LRP, LRP_VARIANT)
    return {
        "linestyle": "--" if role == LRP_VARIANT else "-",
        "lw": 2.5 if lrp else 1.2,
        "zorder": 3 if role == LRP else 2,
    }


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
            if "None" in by_density:  # a method without density: a level line
                axis.axhline(by_density["None"][0], linestyle=":", color="gray", label=method)
                continue
            colour = colours[index % len(colours)]
            means = [by_density[str(d)][0] for d in densities]
            axis.plot(
                densities, means, marker="o", color=colour, label=method, **line_style(method)
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

"""PNG plots of :mod:`.stats` results (matplotlib, Agg backend: no display needed).

Each figure has a title naming the file(s), axes with units and a legend, so it reads
without the terminal that made it. matplotlib is the ``bench`` extra; without it
``lrp-inspect --plots`` refuses with the command that installs it.
"""

from __future__ import annotations

import os
from pathlib import Path

from mergekit_lrp.inspect.stats import InspectError
from mergekit_lrp.merging.tensor_names import KINDS

COLOURS = {
    "attention": "#4c72b0",
    "mlp": "#dd8452",
    "embeddings": "#55a868",
    "norms": "#c44e52",
    "other": "#8172b3",
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InspectError(
            "plots need matplotlib: pip install 'mergekit-lrp[bench]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(layer) -> str:
    return "outside" if layer is None else str(layer)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


def relevance_plot(summary: dict, path: str | os.PathLike) -> Path:
    """Stacked bars: the file's score mass per layer, split by module kind."""
    plt = _pyplot()
    layers = summary["layers"]
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(8, 0.35 * len(layers) + 4), 4.5))
    bottom = [0.0] * len(layers)
    for kind in KINDS:
        heights = [row[kind] for row in layers]
        if not any(heights):
            continue
        ax.bar(x, heights, bottom=bottom, label=kind, color=COLOURS[kind])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_xticks(list(x), [_label(row["layer"]) for row in layers])
    ax.set_xlabel("decoder layer (outside = embeddings, final norm, head)")
    ax.set_ylabel("relevance mass: Σ mean |∂target/∂θ| over entries")
    name = Path(summary["path"]).name
    ax.set_title(
        f"Relevance mass per layer and module kind — {name}\n"
        f"target={summary['target']}, {summary['prompts']} prompts, {summary['tokens']} tokens"
    )
    ax.legend(title="module kind", loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def keep_plot(keep: dict, path: str | os.PathLike) -> Path:
    """Per layer: the share of the task vector's L1 mass lrp and magnitude top-k keep,
    and the overlap (Jaccard) of their masks."""
    plt = _pyplot()
    layers = keep["layers"]
    x = list(range(len(layers)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(9, 0.35 * len(layers) + 5), 6.5))
    width = 0.4
    top.bar(
        [i - width / 2 for i in x],
        [_num(r["lrp_kept"]) for r in layers],
        width,
        label=f"lrp (importance: {keep['importance']})",
        color="#4c72b0",
    )
    top.bar(
        [i + width / 2 for i in x],
        [_num(r["magnitude_kept"]) for r in layers],
        width,
        label="magnitude top-k (|Δ|)",
        color="#dd8452",
    )
    top.axhline(keep["density"], color="grey", linestyle=":", label="density (share of entries)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("share of Σ|Δ| kept (0–1)")
    top.set_xticks(x, [_label(r["layer"]) for r in layers])
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    top.set_title(
        f"What lrp keeps at density {keep['density']} — {Path(keep['path']).name}\n"
        f"Δ = {Path(keep['model']).name} − {Path(keep['base']).name} "
        "(norms, biases, embeddings: kept whole, not shown)"
    )
    bottom.plot(
        x,
        [_num(r["overlap"]) for r in layers],
        marker="o",
        color="#55a868",
        label="Jaccard(lrp mask, magnitude mask)",
    )
    bottom.set_ylim(0, 1.05)
    bottom.set_xticks(x, [_label(r["layer"]) for r in layers])
    bottom.set_xlabel("decoder layer")
    bottom.set_ylabel("mask overlap (Jaccard, 0–1)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _save(fig, path)


def compare_plot(compare: dict, path: str | os.PathLike) -> Path:
    """Per layer and pair of files: Jaccard of top-k masks and Spearman's rho."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    labels: list[str] = []
    for pair in compare["pairs"]:
        layers = pair["layers"]
        labels = [_label(r["layer"]) for r in layers]
        x = list(range(len(layers)))
        name = f"{Path(pair['a']).stem} vs {Path(pair['b']).stem}"
        top.plot(x, [_num(r["jaccard"]) for r in layers], marker="o", label=name)
        bottom.plot(x, [_num(r["spearman"]) for r in layers], marker="o", label=name)
    density = compare["density"]
    top.axhline(
        density / (2 - density), color="grey", linestyle=":", label="unrelated masks: d/(2−d)"
    )
    top.set_ylim(0, 1.05)
    top.set_ylabel("mask overlap (Jaccard, 0–1)")
    top.set_title(
        f"Where score files agree — masks keep {compare['density']:.0%} of each "
        f"tensor, drawn by {compare['masks_from']}\nlow overlap = the experts compete for "
        "different entries"
    )
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    bottom.set_ylim(-1.05, 1.05)
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("Spearman's ρ of the scores (−1–1)")
    bottom.set_xlabel("decoder layer (outside = embeddings, final norm, head)")
    bottom.set_xticks(range(len(labels)), labels)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return _save(fig, path)


def _num(value):
    return float("nan") if value is None else value


def gram_plot(summary: dict, path: str | os.PathLike) -> Path:
    """A Gram file: log10 of each matrix's condition number (singular ones at the top of
    the axis, marked), in the file's order (by layer)."""
    import math

    plt = _pyplot()
    rows = summary["grams"]
    finite = [math.log10(r["condition"]) for r in rows if r["condition"] is not None]
    ceiling = max(finite, default=1.0) + 1.0
    heights = [ceiling if r["condition"] is None else math.log10(r["condition"]) for r in rows]
    colours = ["#c44e52" if r["ill_conditioned"] else "#4c72b0" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(rows) + 4), 4.5))
    ax.bar(range(len(rows)), heights, color=colours)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"].removesuffix(".input_gram") for r in rows], rotation=90,
                       fontsize=6)  # fmt: skip
    ax.set_ylabel("log10 condition number (singular: top bar)")
    ax.set_title(f"Gram matrices of {Path(summary['path']).name} (red: ill-conditioned)")
    return _save(fig, path)

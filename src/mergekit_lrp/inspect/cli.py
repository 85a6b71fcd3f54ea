"""``lrp-inspect``: look at score files before merging with them.

    lrp-inspect scores/a.safetensors                               # summary table
    lrp-inspect a.safetensors --model ./ft-a --base ./base --plots out/   # + what lrp keeps
    lrp-inspect a.safetensors b.safetensors --plots out/           # + where they compete
    lrp-inspect a.safetensors b.safetensors --json                 # everything, as JSON

Errors in the input (:class:`~mergekit_lrp.errors.LrpError`) are printed as one line;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_lrp.errors import LrpError
from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY, DEFAULTS
from mergekit_lrp.merging.parameters import (
    BUDGETS,
    IMPORTANCE_MODES,
    MISSING_SCORES_MODES,
    SELECTION_MODES,
)
from mergekit_lrp.merging.tensor_names import KINDS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    package_name="mergekit-lrp",
    prog_name="lrp-inspect (mergekit-lrp)",
    message="%(prog)s %(version)s",
)
@click.argument("score_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "models",
    multiple=True,
    type=click.Path(file_okay=False),
    help="The checkpoint a score file was computed on; give one per score file, in the "
    "same order (checked by fingerprint). Lists unscored tensors.",
)
@click.option(
    "--base",
    type=click.Path(file_okay=False),
    help="The base model; with --model, shows what lrp keeps of each task vector and "
    "compares files by merge importance instead of raw scores.",
)
@click.option(
    "--density",
    default=DEFAULT_DENSITY,
    show_default=True,
    help="Fraction of each tensor the merge keeps (lrp's default).",
)
@click.option(
    "--importance",
    default=DEFAULTS.importance,
    show_default=True,
    type=click.Choice(IMPORTANCE_MODES),
    help="As the lrp merge parameter of the same name.",
)
@click.option(
    "--selection",
    default=DEFAULTS.selection,
    show_default=True,
    type=click.Choice(SELECTION_MODES),
    help="As the lrp merge parameter: the masks shown are the ones the merge draws.",
)
@click.option(
    "--epsilon",
    type=float,
    default=None,
    help="As the lrp merge parameter (selection stochastic).  [default: lrp's]",
)
@click.option(
    "--budget",
    default=DEFAULTS.budget,
    show_default=True,
    type=click.Choice(BUDGETS),
    help="As the lrp merge parameter: where the density applies (per tensor, layer, model).",
)
@click.option(
    "--missing-scores",
    default=DEFAULTS.missing_scores,
    show_default=True,
    type=click.Choice(MISSING_SCORES_MODES),
    help="As the lrp merge parameter.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="The merge's --random-seed (selection stochastic).",
)
@click.option(
    "--plots",
    "plot_dir",
    type=click.Path(file_okay=False),
    help="Write PNG plots into this directory (created if missing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def main(
    score_files,
    models,
    base,
    density,
    importance,
    selection,
    epsilon,
    budget,
    missing_scores,
    seed,
    plot_dir,
    as_json,
):
    """Summarise, plot and compare lrp-compute score files."""
    from mergekit_lrp.merging.masks import MaskSettings

    try:
        settings = MaskSettings(
            density,
            importance,
            selection,
            epsilon,
            seed,
            budget=budget,
            missing_scores=missing_scores,
        )
        report = inspect_files(score_files, models, base, settings, plot_dir)
    except LrpError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render(report))


def inspect_files(score_files, models=(), base=None, settings=None, plot_dir=None) -> dict:
    """Everything ``lrp-inspect`` reports, as one dict (what ``--json`` prints);
    ``settings`` (:class:`~mergekit_lrp.merging.masks.MaskSettings`, default lrp's) are
    the merge's for the masks shown."""
    from mergekit_lrp.inspect import stats
    from mergekit_lrp.merging.masks import MaskSettings
    from mergekit_lrp.scores.file import ScoreReader

    settings = settings or MaskSettings()
    if models and len(models) != len(score_files):
        raise stats.InspectError(
            f"got {len(score_files)} score file(s) and {len(models)} --model; give one "
            "--model per score file, in the same order, or none"
        )
    if base and not models:
        raise stats.InspectError("--base needs --model (one per score file)")
    readers = [ScoreReader(path) for path in score_files]
    pairs = list(zip(readers, models or [None] * len(readers), strict=True))
    grams = [r.path for r in readers if stats.is_gram_file(r)]
    if grams and base:
        raise stats.InspectError(
            f"{grams[0]} holds Gram matrices (lrp-compute --method gram), not scores: --base "
            "shows what lrp keeps of a task vector by its scores; inspect it without --base"
        )
    report: dict = {
        "files": [
            stats.summarize_gram(r, m) if stats.is_gram_file(r) else stats.summarize(r, m)
            for r, m in pairs
        ],
        "plots": [],
        "notes": [],
    }
    if grams and len(readers) > 1:
        report["notes"].append(
            "no comparison: Gram files (" + ", ".join(map(str, grams)) + ") hold no scores "
            "to rank; each is summarised alone"
        )
        readers = []
    if base:
        report["keep"] = [stats.keep_by_layer(r, base, m, settings, check=False) for r, m in pairs]
    if len(readers) > 1:
        if base:
            mask_of = stats.merge_masks(readers, base, models, settings)
            label = f"the merge ({settings.selection}, importance: {settings.importance})"
        else:
            mask_of, label = None, "scores"
        report["compare"] = stats.compare_files(readers, settings.density, mask_of, label)
    if plot_dir:
        report["plots"] = [str(p) for p in write_plots(report, Path(plot_dir))]
    return report


def write_plots(report: dict, plot_dir: Path) -> list[Path]:
    from mergekit_lrp.inspect import plots

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for summary in report["files"]:
        stem = Path(summary["path"]).stem
        if summary.get("kind") == "gram":
            written.append(plots.gram_plot(summary, plot_dir / f"{stem}-gram.png"))
        else:
            written.append(plots.relevance_plot(summary, plot_dir / f"{stem}-relevance.png"))
    for keep in report.get("keep", []):
        stem = Path(keep["path"]).stem
        written.append(plots.keep_plot(keep, plot_dir / f"{stem}-keep.png"))
    if "compare" in report:
        written.append(plots.compare_plot(report["compare"], plot_dir / "compare.png"))
    return written


def _fmt(value, digits=3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict) -> str:
    """The terminal view of :func:`inspect_files`' report."""
    out = []
    for s in report["files"]:
        if s.get("kind") == "gram":
            out += _render_gram(s)
            continue
        out.append(f"== {s['path']}")
        fields = [
            ("quantity", s["quantity"]),
            *_provenance_fields(s),
            ("tensors", s["tensors"]),
        ]
        width = max(len(k) for k, _ in fields)
        out += [f"{k.ljust(width)}  {v}" for k, v in fields]
        rows = [
            [
                kind,
                s["kinds"][kind]["tensors"],
                s["kinds"][kind]["entries"],
                s["kinds"][kind]["total"],
                f"{s['kinds'][kind]['share']:.1%}",
            ]
            for kind in KINDS
        ]
        out += ["", _table(["kind", "tensors", "entries", "score total", "share"], rows)]
        if s["unscored"] is not None:
            shown = ", ".join(s["unscored"][:8]) + (" …" if len(s["unscored"]) > 8 else "")
            out.append(
                f"\nunscored checkpoint tensors: {len(s['unscored'])}"
                + (f" ({shown})" if shown else "")
            )
        out.append("")
    for keep in report.get("keep", []):
        how = f"{keep['selection']}, importance: {keep['importance']}"
        if keep["selection"] == "stochastic":
            how += f", seed {keep['seed']}"
        out.append(f"== what lrp keeps at density {keep['density']} ({how}): {keep['path']}")
        rows = [
            [_layer(r["layer"]), r["entries"], r["lrp_kept"], r["magnitude_kept"], r["overlap"]]
            for r in keep["layers"]
        ]
        header = ["layer", "entries", "Σ|Δ| kept: lrp", "magnitude", "Jaccard(lrp, mag)"]
        out += [_table(header, rows), ""]
    if "compare" in report:
        c = report["compare"]
        out.append(
            f"== comparison: masks keep {c['density']} of each tensor, drawn by "
            f"{c['masks_from']}; Spearman of the scores; {c['tensors']} shared tensors"
        )
        for pair in c["pairs"]:
            out.append(f"{pair['a']}  vs  {pair['b']}")
            rows = [[_layer(r["layer"]), r["jaccard"], r["spearman"]] for r in pair["layers"]]
            rows.append(["all", pair["overall"]["jaccard"], pair["overall"]["spearman_mean"]])
            out += [_table(["layer", "Jaccard", "Spearman (all: mean)"], rows), ""]
    out += report.get("notes", [])
    for path in report["plots"]:
        out.append(f"wrote {path}")
    return "\n".join(out).rstrip()


def _provenance_fields(s: dict) -> list[tuple[str, object]]:
    """The header lines every file's summary shows: how it was computed, on which model."""
    return [
        ("target", s["target"]),
        ("prompts", s["prompts"]),
        ("tokens", s["tokens"]),
        ("model type", s["model_type"]),
        ("model", s["model"] or "(not given)"),
        ("fingerprint", s["fingerprint"][:16] + ("  (matches)" if s["model"] else "")),
    ]


def _render_gram(s: dict) -> list[str]:
    """A Gram file: metadata, size, one row per matrix (trace, condition, sharing)."""
    from mergekit_lrp.inspect.stats import ILL_CONDITIONED

    fields = [
        ("quantity", f"{s['quantity']} (Gram matrices of linear layers' inputs)"),
        ("tokens weighted", s["token_weighting"]),
        *_provenance_fields(s),
        ("matrices", f"{s['matrices']} for {s['weights']} linear weights"),
        ("size", f"{s['bytes'] / 2**20:.1f} MiB"),
        (
            "ill-conditioned",
            f"{len(s['ill_conditioned'])} (condition number above {ILL_CONDITIONED:.0e} or "
            "singular)",
        ),
    ]
    width = max(len(k) for k, _ in fields)
    out = [f"== {s['path']}", *(f"{k.ljust(width)}  {v}" for k, v in fields)]
    rows = [
        [
            row["name"],
            _layer(row["layer"]),
            row["size"],
            "whole" if row["rank"] is None else _stored_rank(row),
            row["trace"],
            "singular" if row["condition"] is None else f"{row['condition']:.3g}",
            "yes" if row["ill_conditioned"] else "",
            ", ".join(_short(w) for w in row["shared_by"]),
        ]
        for row in s["grams"]
    ]
    header = ["Gram matrix", "layer", "size", "stored rank", "trace", "condition", "ill-cond.",
              "shared by"]  # fmt: skip
    out += ["", _table(header, rows)]
    if s["unscored"] is not None:
        shown = ", ".join(s["unscored"][:8]) + (" …" if len(s["unscored"]) > 8 else "")
        out.append(
            f"\ncheckpoint tensors without a Gram matrix: {len(s['unscored'])}"
            + (f" ({shown})" if shown else "")
        )
    out.append("")
    return out


def _short(weight: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``q_proj``."""
    parts = weight.removesuffix(".weight").split(".")
    return parts[-1] if parts else weight


def _stored_rank(row: dict) -> str:
    """"r (±bound)", or "r (≈estimate)" for a matrix factored from its leading eigenpairs."""
    mark = "≈" if row["error_estimated"] else "±"
    return f"{row['rank']} ({mark}{row['error_bound']:.1g})"


def _layer(layer) -> str:
    return "outside" if layer is None else str(layer)


if __name__ == "__main__":
    main()

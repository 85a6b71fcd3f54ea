"""perf.md: one markdown table per section that ran."""

from __future__ import annotations

from harness.perf_sections import PROFILE_LENGTH


def precompute_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | prompt tokens | plain fwd+bwd s/prompt | relevance s/prompt | time ratio "
        "| time ratio without checkpointing "
        "| relevance tokens/s | fp32 weights MB | plain peak RSS MB | relevance peak RSS MB "
        "| plain (RSS - runtime) / weights | relevance (RSS - runtime) / weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['length']} | {r['plain_s_per_prompt']:.3f} | "
            f"{r['lrp_s_per_prompt']:.3f} | {r['time_ratio']:.2f} | "
            f"{r['time_ratio_no_checkpointing']:.2f} | {r['lrp_tokens_per_s']:.0f} | "
            f"{r['weights_fp32_mb']:.0f} | {r['plain_peak_rss_mb']:.0f} | "
            f"{r['lrp_peak_rss_mb']:.0f} | {r['plain_rss_over_weights']:.2f} | "
            f"{r['lrp_rss_over_weights']:.2f} |"
        )
    return lines


def placement_table(rows: list[dict]) -> list[str]:
    lines = [
        "| device | model | tokens | mode | time / plain fwd+bwd | tokens/s | accumulator share "
        "| peak memory GiB (plain) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "" if r["accumulator_share"] is None else f"{r['accumulator_share']:.2f}"
        lines.append(
            f"| {r['device']} | {r['size']} | {r['length']} | {r['mode']} | "
            f"{r['time_ratio']:.2f} | {r['tokens_per_s']:.0f} | {share} | "
            f"{r['peak_memory_gib']:.2f} ({r['plain_peak_memory_gib']:.2f}) |"
        )
    return lines


def signals_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | prompt tokens | method | s/prompt | time / plain fwd+bwd "
        "| (peak RSS - runtime) / fp32 weights |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['length']} | {r['method']} | {r['s_per_prompt']:.3f} | "
            f"{r['time_ratio']:.2f} | {r['rss_over_weights']:.2f} |"
        )
    return lines


def gram_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | prompt tokens | token weighting | s/prompt | baseline | baseline s/prompt "
        "| time / baseline | (peak RSS - runtime) / fp32 weights (baseline) "
        "| Gram matrices | float32 file MB (fp32 weights MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['length']} | {r['weighting']} | {r['s_per_prompt']:.3f} | "
            f"{r['baseline']} | {r['baseline_s_per_prompt']:.3f} | {r['time_ratio']:.2f} | "
            f"{r['rss_over_weights']:.2f} ({r['baseline_rss_over_weights']:.2f}) | "
            f"{r['gram_matrices']} | {r['gram_float32_mb']:.0f} ({r['weights_fp32_mb']:.0f}) |"
        )
    return lines


def merge_table(merge: dict) -> list[str]:
    return [
        "| fine-tunes | merge | wall time s (median) | time / dare_ties (range over repeats) "
        "| peak RSS MB (median) | RSS / dare_ties |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['fine_tunes']} | {r['setting']} | {r['seconds']:.2f} | "
            f"{r['time_ratio']:.2f} ({r['time_ratio_range'][0]:.2f}–"
            f"{r['time_ratio_range'][1]:.2f}) | {r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} |"
            for r in merge["rows"]
        ],
    ]


def merge_title(merge: dict) -> str:
    counts = " and ".join(str(c) for c in merge["fine_tunes"])
    low, high = merge["load_1min"]
    return (
        f"Merge cost ({merge['size']} Llama, {counts} fine-tunes; 1-minute load average "
        f"{low:.2f}–{high:.2f} during the run)"
    )


def profile_table(rows: list[dict]) -> list[str]:
    return [
        "| operator | plain | relevance, no checkpointing | relevance |",
        "|---|---|---|---|",
        *[
            f"| {r['op']} | {r['plain']:.1f} | {r['lrp-no-checkpointing']:.1f} | {r['lrp']:.1f} |"
            for r in rows
        ],
    ]


def score_dtype_table(rows: list[dict]) -> list[str]:
    return [
        "| density | float32 MB | bfloat16 MB | mask entries flipped |",
        "|---|---|---|---|",
        *[
            f"| {r['density']} | {r['float32_mb']:.0f} | {r['bfloat16_mb']:.0f} | "
            f"{r['flipped_fraction']:.2e} |"
            for r in rows
        ],
    ]


def regmean_solve_tables(result: dict) -> list[str]:
    profile = result["profile"]
    total = profile["seconds"]
    lines = [
        f"regmean merge, {result['size']} Llama, two fine-tunes (cProfile, cumulative):",
        "",
        "| part | seconds | share of the merge |",
        "|---|---|---|",
        f"| the whole merge (run_merge) | {total:.2f} | 1.00 |",
        *[
            f"| {label} | {seconds:.2f} | {seconds / total:.2f} |"
            for label, seconds in profile["parts"].items()
        ],
        "",
        "One layer's solve (7 linear weights, two models, float64):",
        "",
        "| hidden | intermediate | seconds | GFLOP | GFLOP/s | peak RSS MB (before) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["layers"]:
        lines.append(
            f"| {r['hidden']} | {r['intermediate']} | {r['seconds']:.2f} | {r['gflop']:.1f} | "
            f"{r['gflop_per_s']:.1f} | {r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) |"
        )
    return lines


def markdown(results: dict, profile_size: str) -> str:
    """The tables of the sections in ``results``, in this order whatever the run's."""
    sections = {  # name -> result -> (title, table)
        "precompute": lambda rows: ("Precompute cost", precompute_table(rows)),
        "placement": lambda rows: ("Scoring placement", placement_table(rows)),
        "signals": lambda rows: ("Cost of each importance signal", signals_table(rows)),
        "gram": lambda rows: (
            "Gram statistics (--method gram) against a plain forward / forward+backward",
            gram_table(rows),
        ),
        "merge": lambda merge: (merge_title(merge), merge_table(merge)),
        "regmean_solve": lambda result: (
            "Where a regmean merge spends its time",
            regmean_solve_tables(result),
        ),
        "profile": lambda rows: (
            "Where the time goes (torch.profiler, self CPU ms per prompt, "
            f"{profile_size} Llama, {PROFILE_LENGTH} tokens; top operators)",
            profile_table(rows),
        ),
        "score_dtype": lambda rows: ("Score files: float32 vs bfloat16", score_dtype_table(rows)),
    }
    lines = []
    for name, section in sections.items():
        if name in results:
            title, table = section(results[name])
            lines += [f"## {title}", "", *table, ""]
    if "score_dtype" in results:  # the one table without a blank line after it (the last)
        lines.pop()
    return "\n".join(lines) + "\n"

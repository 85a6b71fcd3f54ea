"""The cost benchmark's sections: each measures lrp-compute or the lrp merge against a
baseline timed in the same run, alternating the two so drift on a shared machine hits
both, each measurement in a fresh process (harness.perf_workers)."""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.perf_models import build_model, fine_tunes, gram_file, score_file
from harness.perf_workers import run_worker
from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY


@dataclass(frozen=True)
class Settings:
    """What a run measures, on which models, how often: the command line's options."""

    cache: Path  # models and score files, built once
    quick: bool = False  # the 10M model only, shorter prompts
    repeats: int = 3  # alternating runs of each timing; medians are reported
    device: str = "cpu"  # where the placement section runs
    size: str | None = None  # one model size for every section instead of its own
    merges: tuple[str, ...] | None = None  # the merge section's settings (default: all)
    fine_tunes: tuple[int, ...] | None = None  # the merge section's counts (default: 2, 4)


def sizes(settings: Settings, quick: list[str], full: list[str]) -> list[str]:
    """A section's model sizes: ``--size`` if given, else its quick or full ones."""
    if settings.size:
        return [settings.size]
    return quick if settings.quick else full


def precompute(settings: Settings) -> list[dict]:
    """The relevance pass (AttnLRP rules + checkpointing + accumulator) against a plain
    forward+backward, per prompt, at each size and prompt length; peak RSS of each."""
    rows = []
    lengths = [64, 256] if settings.quick else [128, 512]
    count = 3 if settings.quick else 4
    for size in sizes(settings, ["10M"], ["10M", "100M"]):
        model_dir = build_model(size, settings.cache)
        for length in lengths:
            runs = {"plain": [], "lrp": [], "lrp-no-checkpointing": []}
            for _ in range(settings.repeats):
                for mode in runs:
                    runs[mode].append(
                        run_worker(
                            "precompute",
                            model_dir=str(model_dir),
                            mode=mode,
                            length=length,
                            count=count,
                        )
                    )
            med = {m: statistics.median(r["seconds_per_prompt"] for r in runs[m]) for m in runs}
            lrp = runs["lrp"][0]
            rows.append(
                {
                    "size": size,
                    "length": length,
                    "plain_s_per_prompt": med["plain"],
                    "lrp_s_per_prompt": med["lrp"],
                    "time_ratio": med["lrp"] / med["plain"],
                    "time_ratio_no_checkpointing": med["lrp-no-checkpointing"] / med["plain"],
                    "lrp_tokens_per_s": length / med["lrp"],
                    "weights_fp32_mb": lrp["weights_fp32"] / 2**20,
                    "plain_peak_rss_mb": max(r["peak_rss"] for r in runs["plain"]) / 2**20,
                    "lrp_peak_rss_mb": max(r["peak_rss"] for r in runs["lrp"]) / 2**20,
                    "lrp_rss_over_weights": max(
                        r["peak_rss"] - r["rss_before_model"] for r in runs["lrp"]
                    )
                    / lrp["weights_fp32"],
                    "plain_rss_over_weights": max(
                        r["peak_rss"] - r["rss_before_model"] for r in runs["plain"]
                    )
                    / lrp["weights_fp32"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


#: the merges timed against dare_ties: name -> (merge_method, global parameters, the
#: files it reads: False (none), True (score files) or "gram" (Gram files), per-model
#: parameters). dare_ties runs at lrp's default density with weight 1 (DARE's
#: cost does not depend on either); the defaults rows give nothing but the score files;
#: lrp's rule rows name their whole rule at density 0.5, weight 0.5, so they keep their
#: meaning when the defaults change
AT_HALF = {"weight": 0.5, "density": 0.5}
TOPK = {"selection": "topk", "consensus": "none", "normalize": False}
MERGE_SETTINGS = {
    "dare_ties": ("dare_ties", {}, False, {"weight": 1.0, "density": DEFAULT_DENSITY}),
    "lrp (defaults)": ("lrp", {}, True, {}),
    "circuit (defaults)": ("circuit", {}, False, {}),
    "circuit, score order": ("circuit", {"drop_order": "scores"}, True, {}),
    "lrp stochastic, priority, normalize (d 0.5)": (
        "lrp",
        {"selection": "stochastic", "consensus": "priority", "normalize": True},
        True,
        AT_HALF,
    ),
    "lrp top-k (d 0.5)": ("lrp", TOPK, True, AT_HALF),
    "lrp top-k, priority, normalize (d 0.5)": (
        "lrp",
        {**TOPK, "consensus": "priority", "normalize": True},
        True,
        AT_HALF,
    ),
    "lrp stochastic (d 0.5)": ("lrp", {**TOPK, "selection": "stochastic"}, True, AT_HALF),
    "lrp top-k, consensus relevance (d 0.5)": (
        "lrp",
        {**TOPK, "consensus": "relevance"},
        True,
        AT_HALF,
    ),
    "lrp top-k, winner, normalize (d 0.5)": (
        "lrp",
        {**TOPK, "consensus": "winner", "normalize": True},
        True,
        AT_HALF,
    ),
    "lrp top-k, layer budget (d 0.5)": ("lrp", {**TOPK, "budget": "layer"}, True, AT_HALF),
    "lrp top-k, model budget (d 0.5)": ("lrp", {**TOPK, "budget": "model"}, True, AT_HALF),
    "regmean (defaults)": ("regmean", {}, "gram", {}),
}
BASELINE = "dare_ties"
#: how many fine-tunes the merge section merges, each count against its own dare_ties
FINE_TUNE_COUNTS = (2, 4)


def merge_config(
    setting: str, base: Path, fts: list[Path], scores: list[Path], grams: list[Path] = ()
) -> dict:
    """The fine-tunes merged with ``setting`` (its parameters: :data:`MERGE_SETTINGS`)."""
    method, shared, reads, per_model = MERGE_SETTINGS[setting]
    models = []
    for index, ft in enumerate(fts):
        params = dict(per_model)
        if reads:
            params["lrp_scores"] = str((grams if reads == "gram" else scores)[index])
        models.append({"model": str(ft), "parameters": params})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": shared,
        "dtype": "float32",
    }


def merge(settings: Settings) -> dict:
    """Wall time and peak RSS of each merge setting against dare_ties, for each number of
    fine-tunes; the machine's 1-minute load average before each merge."""
    (size,) = sizes(settings, ["10M"], ["100M"])
    counts = settings.fine_tunes or FINE_TUNE_COUNTS
    base, fts = fine_tunes(size, settings.cache, count=max(counts))
    scores = [
        score_file(ft, settings.cache / f"llama-{size}-ft{i}.float32.safetensors", "float32")
        for i, ft in enumerate(fts, start=1)
    ]
    chosen = settings.merges or tuple(MERGE_SETTINGS)
    names = [s for s in MERGE_SETTINGS if s == BASELINE or s in chosen]
    runs = {count: {s: [] for s in names} for count in counts}
    loads = []
    grams = []
    if any(MERGE_SETTINGS[s][2] == "gram" for s in names):
        grams = [
            gram_file(ft, settings.cache / f"llama-{size}-ft{i}.gram.safetensors")
            for i, ft in enumerate(fts, start=1)
        ]
    for _ in range(settings.repeats):
        for count in counts:
            for index, setting in enumerate(names):
                config = merge_config(setting, base, fts[:count], scores[:count], grams[:count])
                out = str(settings.cache / f"out-{index}")
                loads.append(os.getloadavg()[0])
                runs[count][setting].append(run_worker("merge", config=config, out=out))
    rows = []
    for count in counts:
        baseline = runs[count][BASELINE]
        for setting, rs in runs[count].items():
            seconds = statistics.median(r["seconds"] for r in rs)
            rss = statistics.median(r["peak_rss"] for r in rs)
            ratios = [r["seconds"] / b["seconds"] for r, b in zip(rs, baseline, strict=True)]
            rows.append(
                {
                    "fine_tunes": count,
                    "setting": setting,
                    "seconds": seconds,
                    "time_ratio": seconds / statistics.median(r["seconds"] for r in baseline),
                    "time_ratio_range": [min(ratios), max(ratios)],
                    "peak_rss_mb": rss / 2**20,
                    "rss_ratio": rss / statistics.median(r["peak_rss"] for r in baseline),
                }
            )
    return {
        "size": size,
        "fine_tunes": list(counts),
        "load_1min": [min(loads), max(loads)],
        "runs": {str(count): r for count, r in runs.items()},
        "rows": rows,
    }


def score_dtype(settings: Settings) -> list[dict]:
    """float32 vs bfloat16 score files: size, and the top-k mask entries that flip."""
    from safetensors.torch import load_file

    from mergekit_lrp import merge_mask

    (size,) = sizes(settings, ["10M"], ["100M"])
    base, (ft,) = fine_tunes(size, settings.cache, count=1)
    files = {
        d: score_file(ft, settings.cache / f"llama-{size}-ft1.{d}.safetensors", d)
        for d in ("float32", "bfloat16")
    }
    exact, rounded = load_file(files["float32"]), load_file(files["bfloat16"])
    base_w = load_file(str(base / "model.safetensors"))
    ft_w = load_file(str(ft / "model.safetensors"))
    rows = []
    for density in (0.3, 0.7):
        flipped = total = 0
        for name, s32 in exact.items():
            if ft_w[name].ndim < 2:
                continue
            topk = dict(selection="topk", protect_special=False)
            a = merge_mask(base_w[name], ft_w[name], s32, density, **topk)
            b = merge_mask(base_w[name], ft_w[name], rounded[name], density, **topk)
            flipped += int((a != b).sum())
            total += ft_w[name].numel()
        rows.append(
            {
                "density": density,
                "flipped_fraction": flipped / total,
                "float32_mb": files["float32"].stat().st_size / 2**20,
                "bfloat16_mb": files["bfloat16"].stat().st_size / 2**20,
            }
        )
    return rows


PROFILE_LENGTH = 256


def profile_size(settings: Settings) -> str:
    (size,) = sizes(settings, ["10M"], ["100M"])
    return size


def profile(settings: Settings) -> list[dict]:
    """Where the relevance pass spends its time, operator by operator, against plain:
    the total and the 15 operators of most self CPU time."""
    model_dir = build_model(profile_size(settings), settings.cache)
    modes = ("plain", "lrp-no-checkpointing", "lrp")
    per_mode = {
        m: run_worker("profile", model_dir=str(model_dir), mode=m, length=PROFILE_LENGTH)
        for m in modes
    }
    names = set().union(*per_mode.values())
    rows = [{"op": n, **{m: per_mode[m].get(n, 0.0) for m in modes}} for n in names]
    rows.sort(key=lambda r: -max(r[m] for m in modes))
    totals = {"op": "total", **{m: sum(per_mode[m].values()) for m in modes}}
    return [totals, *rows[:15]]


SIGNAL_MODES = ("plain", "attnlrp", "gradient", "fisher", "activation")


def signals(settings: Settings) -> list[dict]:
    """Each lrp-compute ``--method`` through the real prompt loop against a plain
    forward+backward: time and peak RSS."""
    rows = []
    length, count = (256, 3) if settings.quick else (512, 4)
    (size,) = sizes(settings, ["10M"], ["100M"])
    model_dir = build_model(size, settings.cache)
    runs = {mode: [] for mode in SIGNAL_MODES}
    for _ in range(settings.repeats):
        for mode in runs:
            runs[mode].append(
                run_worker(
                    "signal", model_dir=str(model_dir), mode=mode, length=length, count=count
                )
            )
    plain = statistics.median(r["seconds_per_prompt"] for r in runs["plain"])
    for mode, results in runs.items():
        seconds = statistics.median(r["seconds_per_prompt"] for r in results)
        rows.append(
            {
                "size": size,
                "length": length,
                "method": mode,
                "s_per_prompt": seconds,
                "time_ratio": seconds / plain,
                "rss_over_weights": max(r["peak_rss"] - r["rss_before_model"] for r in results)
                / results[0]["weights_fp32"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


#: --token-weighting -> the plain pass it is timed against
GRAM_MODES = {
    "none": "plain-forward",
    "answer": "plain-forward",
    "relevance": "plain-backward",
    "gradient": "plain-backward",
}


def gram(settings: Settings) -> list[dict]:
    """``lrp-compute --method gram`` with each token weighting through the real prompt
    loop, against a plain forward (none, answer) or a plain forward+backward (relevance,
    gradient): time, peak RSS, and the size of the Gram matrices (the file)."""
    rows = []
    length, count = (256, 3) if settings.quick else (512, 4)
    modes = ("plain-forward", "plain-backward", *GRAM_MODES)
    for size in sizes(settings, ["10M"], ["10M", "100M"]):
        model_dir = build_model(size, settings.cache)
        runs = {mode: [] for mode in modes}
        for _ in range(settings.repeats):
            for mode in modes:
                runs[mode].append(
                    run_worker(
                        "gram", model_dir=str(model_dir), mode=mode, length=length, count=count
                    )  # fmt: skip
                )
        seconds = {m: statistics.median(r["seconds_per_prompt"] for r in runs[m]) for m in modes}
        weights = runs["plain-forward"][0]["weights_fp32"]
        rss = {
            m: max(r["peak_rss"] - r["rss_before_model"] for r in runs[m]) / weights for m in modes
        }
        for mode, baseline in GRAM_MODES.items():
            rows.append(
                {
                    "size": size,
                    "length": length,
                    "weighting": mode,
                    "baseline": baseline,
                    "s_per_prompt": seconds[mode],
                    "baseline_s_per_prompt": seconds[baseline],
                    "time_ratio": seconds[mode] / seconds[baseline],
                    "rss_over_weights": rss[mode],
                    "baseline_rss_over_weights": rss[baseline],
                    "weights_fp32_mb": weights / 2**20,
                    "gram_matrices": runs[mode][0]["gram_matrices"],
                    "gram_float32_mb": runs[mode][0]["gram_bytes"] / 2**20,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


PLACEMENT_MODES = (
    "plain",
    "discard",  # the same pass, gradients dropped: what the sums cost is the rest
    "device-sums",
    "host-sums-sync",
    "host-sums-overlapped",
    "device-sums-checkpointing",
)


def placement(settings: Settings) -> list[dict]:
    """lrp-compute's prompt loop on ``settings.device`` with the sums on the device or the
    host, checkpointing on or off, against a plain forward+backward and against the same
    pass with gradients discarded; per prompt: time ratio, tokens/s, peak memory."""
    rows = []
    if settings.device.startswith("cuda"):
        size_list, length, count = sizes(settings, ["100M"], ["100M", "400M", "1B"]), 512, 8
    else:
        size_list, length, count = sizes(settings, ["10M"], ["10M", "100M"]), 256, 3
    for size in size_list:
        model_dir = build_model(size, settings.cache)
        runs = {mode: [] for mode in PLACEMENT_MODES}
        for _ in range(settings.repeats):
            for mode in runs:
                runs[mode].append(
                    run_worker(
                        "placement",
                        model_dir=str(model_dir),
                        mode=mode,
                        length=length,
                        count=count,
                        device=settings.device,
                    )
                )
        seconds = {m: statistics.median(r["seconds_per_prompt"] for r in runs[m]) for m in runs}
        for mode in PLACEMENT_MODES[1:]:
            rows.append(
                {
                    "device": settings.device,
                    "size": size,
                    "length": length,
                    "mode": mode,
                    "time_ratio": seconds[mode] / seconds["plain"],
                    "tokens_per_s": length / seconds[mode],
                    "accumulator_share": max(0.0, 1 - seconds["discard"] / seconds[mode])
                    if mode in ("device-sums", "host-sums-sync", "host-sums-overlapped")
                    else None,
                    "peak_memory_gib": max(r["peak_device_memory"] for r in runs[mode]) / 2**30,
                    "plain_peak_memory_gib": max(r["peak_device_memory"] for r in runs["plain"])
                    / 2**30,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


REGMEAN_SETTING = "regmean (defaults)"
#: one layer of a Llama of hidden size h (intermediate 2.6875 h, Llama 2 7B's ratio)
SOLVE_HIDDEN = {"tiny": (64,), "quick": (256, 512), "full": (768, 1536, 3072)}


def regmean_solve(settings: Settings) -> dict:
    """Where a regmean merge spends its time (cProfile of one merge at the merge section's
    size: reading Gram matrices, the numerator, factorizations, applying the inverse), and
    the solve of one whole layer (7 linear weights, 4 distinct inputs, two models, float64)
    at growing hidden sizes, each in a fresh process: seconds, GFLOP/s, peak RSS."""
    (size,) = sizes(settings, ["10M"], ["100M"])
    base, fts = fine_tunes(size, settings.cache)
    grams = [
        gram_file(ft, settings.cache / f"llama-{size}-ft{i}.gram.safetensors")
        for i, ft in enumerate(fts, start=1)
    ]
    config = merge_config(REGMEAN_SETTING, base, fts, [], grams)
    profiled = run_worker("merge_profile", config=config, out=str(settings.cache / "out-prof"))
    layers = []
    kind = "tiny" if settings.size == "tiny" else "quick" if settings.quick else "full"
    for hidden in SOLVE_HIDDEN[kind]:
        runs = [run_worker("solve_layer", hidden=hidden) for _ in range(settings.repeats)]
        seconds = statistics.median(r["seconds"] for r in runs)
        layers.append(
            {
                "hidden": hidden,
                "intermediate": runs[0]["intermediate"],
                "seconds": seconds,
                "gflop": runs[0]["flop"] / 1e9,
                "gflop_per_s": runs[0]["flop"] / seconds / 1e9,
                "peak_rss_mb": max(r["peak_rss"] for r in runs) / 2**20,
                "rss_before_mb": runs[0]["rss_before"] / 2**20,
            }
        )
        print(json.dumps(layers[-1]), file=sys.stderr)
    return {"size": size, "profile": profiled, "layers": layers}


#: name -> section, in the order a full run measures them
SECTIONS = {
    "precompute": precompute,
    "merge": merge,
    "regmean_solve": regmean_solve,
    "score_dtype": score_dtype,
    "profile": profile,
    "signals": signals,
    "gram": gram,
    "placement": placement,
}

"""The cost benchmark's sections: each measures lrp-compute or the lrp merge against a
baseline timed in the same run, alternating the two so drift on a shared machine hits
both, each measurement in a fresh process (harness.perf_workers)."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.perf_models import build_model, fine_tunes, gram_file, score_file
from harness.perf_workers import run_worker


@dataclass(frozen=True)
class Settings:
    """What a run measures, on which models, how often: the command line's options."""

    cache: Path  # models and score files, built once
    quick: bool = False  # the 10M model only, shorter prompts
    repeats: int = 3  # alternating runs of each timing; medians are reported
    device: str = "cpu"  # where the placement section runs
    size: str | None = None  # one model size for every section instead of its own
    merges: tuple[str, ...] | None = None  # the merge section's settings (default: all)


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
#: files it reads: False (none), True (score files) or "gram" (Gram files)); lrp rows name
#: their whole rule, so they keep their meaning when the defaults change
TOPK = {"selection": "topk", "consensus": "none", "normalize": False}
MERGE_SETTINGS = {
    "dare_ties": ("dare_ties", {}, False),
    "lrp (defaults: stochastic, priority, normalize)": ("lrp", {}, True),
    "lrp top-k": ("lrp", TOPK, True),
    "lrp top-k, priority, normalize": (
        "lrp",
        {**TOPK, "consensus": "priority", "normalize": True},
        True,
    ),
    "lrp stochastic": ("lrp", {**TOPK, "selection": "stochastic"}, True),
    "lrp top-k, consensus relevance": ("lrp", {**TOPK, "consensus": "relevance"}, True),
    "lrp top-k, winner, normalize": (
        "lrp",
        {**TOPK, "consensus": "winner", "normalize": True},
        True,
    ),
    "lrp top-k, layer budget": ("lrp", {**TOPK, "budget": "layer"}, True),
    "lrp top-k, model budget": ("lrp", {**TOPK, "budget": "model"}, True),
    "circuit": ("circuit", {}, False),
    "circuit, score order": ("circuit", {"drop_order": "scores"}, True),
    "regmean (defaults)": ("regmean", {}, "gram"),
}
BASELINE = "dare_ties"


def merge_config(
    setting: str, base: Path, fts: list[Path], scores: list[Path], grams: list[Path] = ()
) -> dict:
    """The two fine-tunes merged at density 0.5, weight 0.5 (circuit takes neither,
    regmean no density)."""
    method, shared, reads = MERGE_SETTINGS[setting]
    models = []
    for index, ft in enumerate(fts):
        params = {} if method == "circuit" else {"weight": 0.5, "density": 0.5}
        if method == "regmean":
            del params["density"]
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
    """Wall time and peak RSS of each merge setting against dare_ties."""
    (size,) = sizes(settings, ["10M"], ["100M"])
    base, fts = fine_tunes(size, settings.cache)
    scores = [
        score_file(ft, settings.cache / f"llama-{size}-ft{i}.float32.safetensors", "float32")
        for i, ft in enumerate(fts, start=1)
    ]
    chosen = settings.merges or tuple(MERGE_SETTINGS)
    runs = {s: [] for s in MERGE_SETTINGS if s == BASELINE or s in chosen}
    grams = []
    if any(MERGE_SETTINGS[s][2] == "gram" for s in runs):
        grams = [
            gram_file(ft, settings.cache / f"llama-{size}-ft{i}.gram.safetensors")
            for i, ft in enumerate(fts, start=1)
        ]
    for _ in range(settings.repeats):
        for index, setting in enumerate(runs):
            config = merge_config(setting, base, fts, scores, grams)
            out = str(settings.cache / f"out-{index}")
            runs[setting].append(run_worker("merge", config=config, out=out))
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss")}
        for m, rs in runs.items()
    }
    baseline = med[BASELINE]
    return {
        "size": size,
        "runs": runs,
        "rows": [
            {
                "setting": setting,
                "seconds": m["seconds"],
                "time_ratio": m["seconds"] / baseline["seconds"],
                "peak_rss_mb": m["peak_rss"] / 2**20,
                "rss_ratio": m["peak_rss"] / baseline["peak_rss"],
            }
            for setting, m in med.items()
        ],
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
    "placement": placement,
}

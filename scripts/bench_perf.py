"""Cost of mergekit-lrp against its baselines, measured side by side in one run.

    python scripts/bench_perf.py [--quick] [--out bench-out/perf]

Sections (each a ratio against a baseline measured in the same run, alternating):
  precompute: relevance pass (AttnLRP rules + checkpointing + CPU accumulator) vs a plain
              forward+backward, per prompt, at two model sizes and two prompt lengths; peak
              RSS of each in a fresh process, against the fp32 weight size.
  merge:      `lrp` (default and each merge rule) and `circuit` vs mergekit's `dare_ties` on a
              ~100M Llama and two fine-tunes: wall time
              and peak RSS, each merge in a fresh process, median of alternating runs.
  scores:     float32 vs bfloat16 score files: size, and top-k mask entries that flip.
  signals:    each `lrp-compute --method` (attnlrp, gradient, fisher, activation) through the
              real prompt loop, against a plain forward+backward: time and peak RSS.
  placement:  the scoring loop on --device (cpu or cuda) with sums on the device or the
              host, checkpointing on or off, against a plain forward+backward and against
              the same pass with gradients discarded (the accumulator's share); per prompt:
              time ratio, tokens/s, peak device memory. On a GPU: models up to ~1B
              parameters, 512-token prompts (`--device cuda`).
Writes perf.json and perf.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # name -> LlamaConfig overrides
    "10M": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
    "100M": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
}


SECTIONS = ("precompute", "merge", "score_dtype", "profile", "signals", "placement")
PLACEMENT_MODES = (
    "plain",
    "discard",
    "device-sums",
    "host-sums-sync",
    "host-sums-overlapped",
    "device-sums-checkpointing",
)
GPU_SIZES = {  # name -> LlamaConfig overrides, random weights built on the fly
    "400M": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
SIGNAL_MODES = ("plain", "attnlrp", "gradient", "fisher", "activation")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(size: str, root: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama of the given size, saved once (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{size}"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        shape = {**SIZES, **GPU_SIZES}[size]
        config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, **shape)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_prompts(vocab: int, length: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator) for _ in range(count)]


def plain_seconds(model, prompts, device="cpu", synchronize=lambda: None) -> list[float]:
    """Seconds of a plain forward+backward (argmax logit at the last token) per prompt."""
    model.train()
    times = []
    for ids in prompts:
        synchronize()
        start = time.perf_counter()
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits
        logits[0, -1].float().max().backward()
        model.zero_grad(set_to_none=True)
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def load_for_worker(model_dir: str, length: int, count: int):
    """(float32 model, count + 1 random prompts, peak RSS before loading, fp32 weight bytes)
    in a fresh worker process, with BENCH_THREADS torch threads."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rss_before_model = peak_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = sum(p.numel() for p in model.parameters()) * 4
    return (
        model,
        random_prompts(model.config.vocab_size, length, count + 1),
        rss_before_model,
        weights,
    )


def worker_precompute(model_dir: str, mode: str, length: int, count: int) -> dict:
    """One measurement in this (fresh) process: seconds per prompt and peak RSS."""
    from mergekit_lrp.scoring.accumulator import GradientAccumulator
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules
    from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass

    model, prompts, rss_before_model, weights = load_for_worker(model_dir, length, count)
    times = []
    if mode == "plain":
        times = plain_seconds(model, prompts)
    else:
        accumulator = GradientAccumulator(dict(model.named_parameters()))
        with attnlrp_rules(model), backward_ready(model, checkpointing=mode == "lrp"):
            accumulator.attach()
            for ids in prompts:
                start = time.perf_counter()
                relevance_pass(model, ids, torch.ones_like(ids), "predicted")
                times.append(time.perf_counter() - start)
            accumulator.detach()
    per_prompt = statistics.median(times[1:])  # the first prompt warms up
    return {
        "seconds_per_prompt": per_prompt,
        "tokens_per_second": length / per_prompt,
        "peak_rss": peak_rss_bytes(),
        "rss_before_model": rss_before_model,
        "weights_fp32": weights,
    }


def worker_signal(model_dir: str, mode: str, length: int, count: int) -> dict:
    """One signal through lrp-compute's loop (default options), in this fresh process."""
    from mergekit_lrp.scoring.loop import new_accumulator, run_prompts
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.prompts import Prompt
    from mergekit_lrp.scoring.resume import LoopState

    model, prompts, rss_before_model, weights = load_for_worker(model_dir, length, count)
    times = []
    if mode == "plain":
        times = plain_seconds(model, prompts)
    else:
        options = ComputeOptions(method=mode, progress=False)
        accumulator = new_accumulator(model, dict(model.named_parameters()), mode)
        for ids in prompts:  # one prompt a call, so each is timed alone
            start = time.perf_counter()
            run_prompts(model, [Prompt(tuple(ids.tolist()))], options, accumulator, LoopState())
            times.append(time.perf_counter() - start)
    per_prompt = statistics.median(times[1:])  # the first prompt warms up
    return {
        "seconds_per_prompt": per_prompt,
        "peak_rss": peak_rss_bytes(),
        "rss_before_model": rss_before_model,
        "weights_fp32": weights,
    }


def worker_placement(model_dir: str, mode: str, length: int, count: int, device: str) -> dict:
    """One placement mode through lrp-compute's loop on ``device``, in a fresh process."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.scoring.accumulator import GradientAccumulator
    from mergekit_lrp.scoring.loop import run_prompts
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.prompts import Prompt
    from mergekit_lrp.scoring.resume import LoopState

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    prompts = random_prompts(model.config.vocab_size, length, count + 1)

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    if mode == "plain":  # the first prompt warms up
        per_prompt = statistics.median(plain_seconds(model, prompts, device, synchronize)[1:])
    else:
        parameters = dict(model.named_parameters())
        host = mode.startswith("host-sums")
        accumulator = GradientAccumulator(
            parameters, on_device=not host, overlap=mode == "host-sums-overlapped"
        )
        if mode == "discard":  # the same pass, gradients dropped as they complete
            accumulator.attach = lambda: accumulator._handles.extend(
                p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
                for p in parameters.values()
            )
        options = ComputeOptions(
            progress=False, gradient_checkpointing=mode == "device-sums-checkpointing"
        )
        # one loop over the prompts, as lrp-compute runs them: host additions may overlap
        # the next prompt's compute, and the loop waits for the last of them at its end
        loop = [Prompt(tuple(ids.tolist())) for ids in prompts]
        run_prompts(model, loop[:1], options, accumulator, LoopState())  # warm-up
        synchronize()
        start = time.perf_counter()
        run_prompts(model, loop[1:], options, accumulator, LoopState())
        synchronize()
        per_prompt = (time.perf_counter() - start) / (len(loop) - 1)
    return {
        "seconds_per_prompt": per_prompt,
        "peak_device_memory": torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def bench_placement(root: Path, quick: bool, repeats: int, device: str) -> list[dict]:
    rows = []
    if device.startswith("cuda"):
        sizes, length, count = (["100M"] if quick else ["100M", "400M", "1B"]), 512, 8
    else:
        sizes, length, count = (["10M"] if quick else ["10M", "100M"]), 256, 3
    for size in sizes:
        model_dir = build_model(size, root)
        runs = {mode: [] for mode in PLACEMENT_MODES}
        for _ in range(repeats):  # alternate so drift on a shared machine hits all
            for mode in runs:
                args = ("placement", str(model_dir), mode, str(length), str(count), device)
                runs[mode].append(run_worker(*args))
        seconds = {m: statistics.median(r["seconds_per_prompt"] for r in runs[m]) for m in runs}
        for mode in PLACEMENT_MODES[1:]:
            rows.append(
                {
                    "device": device,
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


def placement_table(rows: list[dict]) -> str:
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
    return "\n".join(lines)


def bench_signals(root: Path, quick: bool, repeats: int) -> list[dict]:
    rows = []
    size, length, count = ("10M", 256, 3) if quick else ("100M", 512, 4)
    model_dir = build_model(size, root)
    runs = {mode: [] for mode in SIGNAL_MODES}
    for _ in range(repeats):  # alternate so drift on a shared machine hits all
        for mode in runs:
            runs[mode].append(run_worker("signal", str(model_dir), mode, str(length), str(count)))
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


def signals_table(rows: list[dict]) -> str:
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
    return "\n".join(lines)


def worker_profile(model_dir: str, mode: str, length: int) -> dict:
    """Self CPU time per operator over 3 prompts (after one warm-up), by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.scoring.accumulator import GradientAccumulator
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules
    from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = random_prompts(model.config.vocab_size, length, 4)
    with contextlib.ExitStack() as stack:
        if mode == "plain":
            model.train()

            def step(ids):
                model(input_ids=ids[None], use_cache=False).logits[0, -1].max().backward()
                model.zero_grad(set_to_none=True)
        else:
            accumulator = GradientAccumulator(dict(model.named_parameters()))
            stack.enter_context(attnlrp_rules(model))
            stack.enter_context(backward_ready(model, checkpointing=mode == "lrp"))
            accumulator.attach()
            stack.callback(accumulator.detach)

            def step(ids):
                relevance_pass(model, ids, torch.ones_like(ids), "predicted")

        step(prompts[0])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for ids in prompts[1:]:
                step(ids)
    return {
        event.key: event.self_cpu_time_total / 1e3 / 3  # ms per prompt
        for event in prof.key_averages()
    }


def bench_profile(root: Path, size: str, length: int) -> list[dict]:
    """Where the relevance pass spends its time, operator by operator, against plain."""
    model_dir = build_model(size, root)
    modes = ("plain", "lrp-no-checkpointing", "lrp")
    per_mode = {m: run_worker("profile", str(model_dir), m, str(length)) for m in modes}
    names = set().union(*per_mode.values())
    rows = [{"op": n, **{m: per_mode[m].get(n, 0.0) for m in modes}} for n in names]
    rows.sort(key=lambda r: -max(r[m] for m in modes))
    totals = {"op": "total", **{m: sum(per_mode[m].values()) for m in modes}}
    return [totals, *rows[:15]]


def perturbed_copy(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A stand-in fine-tune: base plus seeded noise (enough for measuring cost)."""
    from transformers import AutoModelForCausalLM

    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.abs().mean())
        model.save_pretrained(out)
    return out


def score_file(model_dir: Path, out: Path, dtype: str, prompts: int = 4) -> Path:
    """Real scores from the relevance pass on a few random-token prompts."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import SCHEME, model_fingerprint
    from mergekit_lrp.scoring.loop import relevance_scores

    if out.exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Ids:  # a tokenizer stand-in: prompts are already token ids
        def __call__(self, ids):
            return {"input_ids": ids.tolist()}

    sums = relevance_scores(model, Ids(), random_prompts(model.config.vocab_size, 64, prompts))
    metadata = ScoreMetadata(
        model_fingerprint=model_fingerprint(model_dir),
        num_prompts=prompts,
        num_tokens=64 * prompts,
        target="predicted",
        model_type="llama",
        fingerprint_scheme=SCHEME,
    )
    write_scores(out, sums, metadata, dtype=getattr(torch, dtype))
    return out


#: the merges timed against dare_ties: name -> (merge_method, global parameters, scores?);
#: lrp rows name their whole rule, so they keep their meaning when the defaults change
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
}


def merge_config(setting: str, base: Path, fts: list[Path], scores: list[Path]) -> dict:
    method, shared, uses_scores = MERGE_SETTINGS[setting]
    models = []
    for ft, scores_path in zip(fts, scores, strict=True):
        params = {} if method == "circuit" else {"weight": 0.5, "density": 0.5}
        if uses_scores:
            params["lrp_scores"] = str(scores_path)
        models.append({"model": str(ft), "parameters": params})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": models,
        "parameters": shared,
        "dtype": "float32",
    }


def worker_merge(config_path: str, out: str) -> dict:
    """One merge through mergekit's run_merge in this fresh process."""
    import shutil

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = MergeConfiguration.model_validate(json.loads(Path(config_path).read_text()))
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    run_merge(
        config,
        out,
        MergeOptions(quiet=True, random_seed=0, copy_tokenizer=False, write_model_card=False),
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": rss_before}


def bench_merge(root: Path, quick: bool, repeats: int) -> dict:
    size = "10M" if quick else "100M"
    base = build_model(size, root)
    fts = [perturbed_copy(base, root / f"llama-{size}-ft{i}", seed=i) for i in (1, 2)]
    scores = [
        score_file(ft, root / f"llama-{size}-ft{i}.float32.safetensors", "float32")
        for i, ft in zip((1, 2), fts, strict=True)
    ]
    runs = {setting: [] for setting in MERGE_SETTINGS}
    for _ in range(max(3, repeats)):  # alternate, so machine drift hits all
        for index, setting in enumerate(runs):
            config = root / f"merge-{index}.json"
            config.write_text(json.dumps(merge_config(setting, base, fts, scores)))
            runs[setting].append(run_worker("merge", str(config), str(root / f"out-{index}")))
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss")}
        for m, rs in runs.items()
    }
    baseline = med["dare_ties"]
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


def bench_score_dtype(root: Path, quick: bool) -> list[dict]:
    """float32 vs bfloat16 score files: size, and top-k mask entries that flip."""
    from safetensors.torch import load_file

    from mergekit_lrp.merging.selection import kept_count, top_k_mask

    size = "10M" if quick else "100M"
    base = build_model(size, root)
    ft = perturbed_copy(base, root / f"llama-{size}-ft1", seed=1)
    files = {
        d: score_file(ft, root / f"llama-{size}-ft1.{d}.safetensors", d)
        for d in ("float32", "bfloat16")
    }
    exact, rounded = load_file(files["float32"]), load_file(files["bfloat16"])
    base_w = load_file(str(base / "model.safetensors"))
    ft_w = load_file(str(ft / "model.safetensors"))
    rows = []
    for density in (0.3, 0.7):
        flipped = total = 0
        for name, s32 in exact.items():
            delta = ft_w[name] - base_w[name]
            if delta.ndim < 2:
                continue
            k = kept_count(density, delta.numel())
            a = top_k_mask(delta.abs() * s32, k)
            b = top_k_mask(delta.abs() * rounded[name].float(), k)
            flipped += int((a != b).sum())
            total += delta.numel()
        rows.append(
            {
                "density": density,
                "flipped_fraction": flipped / total,
                "float32_mb": files["float32"].stat().st_size / 2**20,
                "bfloat16_mb": files["bfloat16"].stat().st_size / 2**20,
            }
        )
    return rows


def run_worker(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_precompute(root: Path, quick: bool, repeats: int) -> list[dict]:
    rows = []
    sizes = ["10M"] if quick else ["10M", "100M"]
    lengths = [64, 256] if quick else [128, 512]
    count = 3 if quick else 4
    for size in sizes:
        model_dir = build_model(size, root)
        for length in lengths:
            runs = {"plain": [], "lrp": [], "lrp-no-checkpointing": []}
            for _ in range(repeats):  # alternate so drift on a shared machine hits all
                for mode in runs:
                    runs[mode].append(
                        run_worker("precompute", str(model_dir), mode, str(length), str(count))
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


def precompute_table(rows: list[dict]) -> str:
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
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10M model only, shorter prompts")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternating repeats of each timing (medians are reported)",
    )
    parser.add_argument("--out", default="bench-out/perf")
    parser.add_argument("--cache", default=".cache/mergekit-lrp/perf-models")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        help="run only these sections (default: all)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N], for the placement section"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "precompute":
            model_dir, mode, length, count = rest
            print(json.dumps(worker_precompute(model_dir, mode, int(length), int(count))))
        elif kind == "profile":
            model_dir, mode, length = rest
            print(json.dumps(worker_profile(model_dir, mode, int(length))))
        elif kind == "placement":
            model_dir, mode, length, count, device = rest
            print(json.dumps(worker_placement(model_dir, mode, int(length), int(count), device)))
        elif kind == "signal":
            model_dir, mode, length, count = rest
            print(json.dumps(worker_signal(model_dir, mode, int(length), int(count))))
        else:
            print(json.dumps(worker_merge(*rest)))
        return
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    profile_size = "10M" if args.quick else "100M"
    sections = {
        "precompute": lambda: bench_precompute(cache, args.quick, args.repeats),
        "merge": lambda: bench_merge(cache, args.quick, args.repeats),
        "score_dtype": lambda: bench_score_dtype(cache, args.quick),
        "profile": lambda: bench_profile(cache, profile_size, 256),
        "signals": lambda: bench_signals(cache, args.quick, args.repeats),
        "placement": lambda: bench_placement(cache, args.quick, args.repeats, args.device),
    }
    results = {name: run() for name, run in sections.items() if name in args.only}
    results["command"] = " ".join(["python", "scripts/bench_perf.py", *sys.argv[1:]])
    (out / "perf.json").write_text(json.dumps(results, indent=2))
    lines = []
    if "precompute" in results:
        lines += ["## Precompute cost", "", precompute_table(results["precompute"]), ""]
    if "placement" in results:
        lines += ["## Scoring placement", "", placement_table(results["placement"]), ""]
    if "signals" in results:
        lines += ["## Cost of each importance signal", "", signals_table(results["signals"]), ""]
    if "merge" in results:
        merge = results["merge"]
        lines += [
            f"## Merge cost ({merge['size']} Llama, two fine-tunes, density 0.5)",
            "",
            "| merge | wall time s (median) | time / dare_ties | peak RSS MB (median) | "
            "RSS / dare_ties |",
            "|---|---|---|---|---|",
            *[
                f"| {r['setting']} | {r['seconds']:.2f} | {r['time_ratio']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} |"
                for r in merge["rows"]
            ],
            "",
        ]
    if "profile" in results:
        lines += [
            "## Where the time goes (torch.profiler, self CPU ms per prompt, "
            f"{profile_size} Llama, 256 tokens; top operators)",
            "",
            "| operator | plain | relevance, no checkpointing | relevance |",
            "|---|---|---|---|",
            *[
                f"| {r['op']} | {r['plain']:.1f} | {r['lrp-no-checkpointing']:.1f} | "
                f"{r['lrp']:.1f} |"
                for r in results["profile"]
            ],
            "",
        ]
    if "score_dtype" in results:
        lines += [
            "## Score files: float32 vs bfloat16",
            "",
            "| density | float32 MB | bfloat16 MB | mask entries flipped |",
            "|---|---|---|---|",
            *[
                f"| {r['density']} | {r['float32_mb']:.0f} | {r['bfloat16_mb']:.0f} | "
                f"{r['flipped_fraction']:.2e} |"
                for r in results["score_dtype"]
            ],
        ]
    report = "\n".join(lines) + "\n"
    (out / "perf.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

"""Cost of mergekit-lrp against its baselines, measured side by side in one run.

    python scripts/bench_perf.py [--quick] [--out bench-out/perf]

Sections (each a ratio against a baseline measured in the same run, alternating):
  precompute: relevance pass (AttnLRP rules + checkpointing + CPU accumulator) vs a plain
              forward+backward, per prompt, at two model sizes and two prompt lengths; peak
              RSS of each in a fresh process, against the fp32 weight size.
  merge:      `lrp` vs mergekit's `dare_ties` on a ~100M Llama and two fine-tunes: wall time
              and peak RSS, each merge in a fresh process, median of alternating runs.
  scores:     float32 vs bfloat16 score files: size, and top-k mask entries that flip.
Writes perf.json and perf.md into --out.
"""

from __future__ import annotations

import argparse
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
    "10M": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=4096),
    "100M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, vocab_size=8192),
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(size: str, root: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama of the given size, saved once (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{size}"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        config = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False,
                             **SIZES[size])
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_prompts(vocab: int, length: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator) for _ in range(count)]


def worker_precompute(model_dir: str, mode: str, length: int, count: int) -> dict:
    """One measurement in this (fresh) process: seconds per prompt and peak RSS."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.accumulator import GradientAccumulator
    from mergekit_lrp.attnlrp import attnlrp_rules
    from mergekit_lrp.relevance import backward_ready, relevance_pass

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rss_before_model = peak_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = sum(p.numel() for p in model.parameters()) * 4
    prompts = random_prompts(model.config.vocab_size, length, count + 1)
    times = []
    if mode == "plain":
        model.train()
        for ids in prompts:
            start = time.perf_counter()
            logits = model(input_ids=ids[None], use_cache=False).logits
            logits[0, -1].max().backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    else:
        accumulator = GradientAccumulator(dict(model.named_parameters()))
        with attnlrp_rules(model), backward_ready(model):
            accumulator.attach()
            for ids in prompts:
                start = time.perf_counter()
                relevance_pass(model, ids, torch.ones_like(ids), "predicted")
                times.append(time.perf_counter() - start)
            accumulator.detach()
    per_prompt = statistics.median(times[1:])  # the first prompt warms up
    return {"seconds_per_prompt": per_prompt, "tokens_per_second": length / per_prompt,
            "peak_rss": peak_rss_bytes(), "rss_before_model": rss_before_model,
            "weights_fp32": weights}


def run_worker(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_precompute(root: Path, quick: bool) -> list[dict]:
    rows = []
    sizes = ["10M"] if quick else ["10M", "100M"]
    lengths = [64, 256] if quick else [128, 512]
    count = 3 if quick else 5
    repeats = 1 if quick else 3
    for size in sizes:
        model_dir = build_model(size, root)
        for length in lengths:
            runs = {"plain": [], "lrp": []}
            for _ in range(repeats):  # alternate so drift on a shared machine hits both
                for mode in ("plain", "lrp"):
                    runs[mode].append(run_worker("precompute", str(model_dir), mode,
                                                 str(length), str(count)))
            med = {m: statistics.median(r["seconds_per_prompt"] for r in runs[m]) for m in runs}
            lrp = runs["lrp"][0]
            rows.append({
                "size": size, "length": length,
                "plain_s_per_prompt": med["plain"], "lrp_s_per_prompt": med["lrp"],
                "time_ratio": med["lrp"] / med["plain"],
                "lrp_tokens_per_s": length / med["lrp"],
                "weights_fp32_mb": lrp["weights_fp32"] / 2**20,
                "plain_peak_rss_mb": max(r["peak_rss"] for r in runs["plain"]) / 2**20,
                "lrp_peak_rss_mb": max(r["peak_rss"] for r in runs["lrp"]) / 2**20,
                "lrp_rss_over_weights": max(r["peak_rss"] - r["rss_before_model"]
                                            for r in runs["lrp"]) / lrp["weights_fp32"],
                "plain_rss_over_weights": max(r["peak_rss"] - r["rss_before_model"]
                                              for r in runs["plain"]) / lrp["weights_fp32"],
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def precompute_table(rows: list[dict]) -> str:
    lines = [
        "| model | prompt tokens | plain fwd+bwd s/prompt | relevance s/prompt | time ratio "
        "| relevance tokens/s | fp32 weights MB | plain peak RSS MB | relevance peak RSS MB "
        "| plain (RSS - runtime) / weights | relevance (RSS - runtime) / weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['length']} | {r['plain_s_per_prompt']:.3f} | "
            f"{r['lrp_s_per_prompt']:.3f} | {r['time_ratio']:.2f} | {r['lrp_tokens_per_s']:.0f} | "
            f"{r['weights_fp32_mb']:.0f} | {r['plain_peak_rss_mb']:.0f} | "
            f"{r['lrp_peak_rss_mb']:.0f} | {r['plain_rss_over_weights']:.2f} | "
            f"{r['lrp_rss_over_weights']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid, one repeat")
    parser.add_argument("--out", default="bench-out/perf")
    parser.add_argument("--cache", default=".cache/mergekit-lrp/perf-models")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "precompute":
            model_dir, mode, length, count = rest
            print(json.dumps(worker_precompute(model_dir, mode, int(length), int(count))))
        return
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    results = {"precompute": bench_precompute(cache, args.quick)}
    (out / "perf.json").write_text(json.dumps(results, indent=2))
    report = "## Precompute cost\n\n" + precompute_table(results["precompute"]) + "\n"
    (out / "perf.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

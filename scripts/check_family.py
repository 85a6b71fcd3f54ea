"""Build (or reuse) the toy family and check the six acceptance criteria.

1. DARE: each expert keeps >= 95% of its answer-NLL gain when half of its own delta is
   dropped at random and the rest rescaled (mergekit ``dare_linear``, mean of 3 seeds).
2. Isolation: no expert moves another task below the base by more than 25% of that
   task's expert gain in NLL, or by more than 5 points of exact match.
3. Mergeability: the best baseline merge of all experts (``task_arithmetic``, ``ties``,
   ``dare_ties`` with per-model weight 1/N, 0.5 or 1) keeps >= 20% of every expert's gain.
4. Learning: every exact-match task's expert gains >= 0.25 exact match over the base
   (hence from a base at most 0.75 on it: not saturated); the text expert lowers its NLL.
5. Specialisation: on each expert j's skill, every other expert i gains less than half of
   expert j's own gain over the base, in exact match (EM_i - EM_base < 0.5 (EM_j - EM_base))
   and in answer NLL (kept fraction of expert i on j's task < 0.5).
6. Build time: the family was built in at most 15 minutes (family.json's seconds.total).

It also prints the held-out text NLL (test windows) of the base, each expert and the
multi-task model: not a criterion, the base's text ability that a merge can keep or lose.
Criteria 4-6 are printed first; ``--reference-only`` stops there.

Merges run through mergekit's real entry point, in-process. Exit code 1 if any criterion
that applies fails: all six, except for a family in ``ACCEPTED_UNDER`` with fewer.
"""

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

from toy_family import Family, build_family, evaluate_model, kept_fraction  # noqa: E402
from toy_family.evaluate import expert_metrics, reference_metrics, text_nll  # noqa: E402
from toy_family.family import ACCEPTED_UNDER  # noqa: E402

DARE_KEEP = 0.95
DARE_SEEDS = (0, 1, 2)
MAX_DAMAGE = 0.25
MAX_EM_DROP = 0.05
MIN_MERGE_KEEP = 0.20
MIN_EM_GAIN = 0.25
METHODS = ("task_arithmetic", "ties", "dare_ties")
MAX_CROSS_GAIN = 0.5
MAX_BUILD_SECONDS = 15 * 60
ALL_CRITERIA = (1, 2, 3, 4, 5, 6)


@dataclass(frozen=True)
class CrossCell:
    """Expert ``expert`` on expert ``task``'s skill, against the base and that task's expert."""

    expert: str
    task: str
    em_gain: float  # EM_i - EM_base on the task
    own_em_gain: float  # EM_j - EM_base: the task's own expert
    kept: float  # (NLL_base - NLL_i) / (NLL_base - NLL_j) on the task's answers

    @property
    def em_ok(self) -> bool:
        return self.em_gain < MAX_CROSS_GAIN * self.own_em_gain

    @property
    def nll_ok(self) -> bool:
        return self.kept < MAX_CROSS_GAIN  # False for NaN (an expert with no NLL gain)

    @property
    def passed(self) -> bool:
        return self.em_ok and self.nll_ok


def specialisation(base: dict, experts: dict, tasks) -> list[CrossCell]:
    """Criterion 5's cells: every expert i on every other expert j's exact-match skill.

    ``base[task]`` and ``experts[f"expert-{i}"][task]`` hold ``exact_match`` and
    ``answer_nll`` (as ``evaluate_model`` returns them); tasks without exact match (the
    text domain) are not skills and get no cells.
    """
    cells = []
    for task in tasks:
        if base[task]["exact_match"] is None:
            continue
        em0, nll0 = base[task]["exact_match"], base[task]["answer_nll"]
        own = experts[f"expert-{task}"][task]
        own_gain = nll0 - own["answer_nll"]
        for expert in tasks:
            if expert == task:
                continue
            other = experts[f"expert-{expert}"][task]
            gain = nll0 - other["answer_nll"]
            cells.append(
                CrossCell(
                    expert=expert,
                    task=task,
                    em_gain=other["exact_match"] - em0,
                    own_em_gain=own["exact_match"] - em0,
                    kept=gain / own_gain if own_gain else float("nan"),
                )
            )
    return cells


def specialisation_table(cells: list[CrossCell], tasks) -> list[str]:
    """Rows per expert i, a column per skill j: ``EM gain / kept``, FAIL where it fails."""
    skills = [t for t in tasks if any(c.task == t for c in cells)]
    by = {(c.expert, c.task): c for c in cells}
    own = {c.task: c.own_em_gain for c in cells}
    lines = ["  " + f"{'':13s}" + "".join(f"{t:>20s}" for t in skills)]
    for expert in tasks:
        row = []
        for task in skills:
            cell = by.get((expert, task))
            if cell is None:
                row.append(f"{'own EM ' + format(own[task], '+.2f'):>20s}")
            else:
                mark = "" if cell.passed else "!"
                row.append(f"{cell.em_gain:+.2f} / {cell.kept:+.2f}{mark:1s}".rjust(20))
        lines.append(f"  expert-{expert:5s}" + "".join(row))
    return lines


def build_time_ok(seconds: dict) -> bool:
    """Criterion 6: the whole build (family.json's ``seconds.total``) within 15 minutes."""
    return seconds["total"] <= MAX_BUILD_SECONDS


def required_criteria(preset: str) -> tuple[int, ...]:
    """The criteria that decide the exit code: those the family was accepted under."""
    return ACCEPTED_UNDER.get(preset, ALL_CRITERIA)


def verdict(failed: set[int], required: tuple[int, ...]) -> tuple[bool, str]:
    """Whether the required criteria all passed, and the closing line to print."""
    blocking = sorted(failed & set(required))
    waived = sorted(failed - set(required))
    if not failed:
        return True, "ALL PASS"
    note = (
        f"; criteria {', '.join(map(str, waived))} failed but are not required of this family"
        f" (accepted under criteria {', '.join(map(str, required))})"
        if waived
        else ""
    )
    if blocking:
        return False, f"FAILED: criteria {', '.join(map(str, blocking))}{note}"
    return True, f"PASS{note}"


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
        help="build and check criteria 4-6 only (a quick look while iterating on a recipe)",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    family = build_family(args.cache, preset=args.preset, seed=args.seed)
    split = args.split
    reference = reference_metrics(family, split)
    base = reference["base"]
    failed: set[int] = set()
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
        if not passed:
            failed.add(4)
        print(
            f"  {task:5s} base {fmt_em(em0)} / {base[task]['answer_nll']:.3f}"
            f"   expert {fmt_em(em1)} / {expert['answer_nll']:.3f}"
            f"   {gain}  {'PASS' if passed else 'FAIL'}"
        )

    cross = expert_metrics(family, split)
    cells = specialisation(base, cross, family.tasks)
    print(
        f"\n5. specialisation: expert i on expert j's skill, EM gain over the base / kept"
        f" fraction of NLL gain; each < {MAX_CROSS_GAIN} of expert j's own (! fails)"
    )
    for line in specialisation_table(cells, family.tasks):
        print(line)
    bad = [c for c in cells if not c.passed]
    if bad:
        failed.add(5)
    worst_em = max((c.em_gain / c.own_em_gain for c in cells if c.own_em_gain > 0), default=0)
    worst_kept = max((c.kept for c in cells), default=0)
    print(
        f"  largest EM gain / own gain {worst_em:+.2f}, largest kept {worst_kept:+.2f}:"
        f" {len(cells) - len(bad)} of {len(cells)} pairs pass  {'FAIL' if bad else 'PASS'}"
    )

    passed = build_time_ok(built["seconds"])
    if not passed:
        failed.add(6)
    models = ", ".join(
        f"{name} {seconds:.0f}" for name, seconds in built["seconds"].items() if name != "total"
    )
    print(
        f"\n6. build time {built['seconds']['total']:.0f} s <= {MAX_BUILD_SECONDS} s"
        f"  {'PASS' if passed else 'FAIL'}  ({models})"
    )

    text = text_nll(family, "test")
    print("\ntext NLL per token (test windows; not a criterion): base, experts, multi-task")
    for name, nll in text.items():
        delta = "" if name == "base" else f"  {nll - text['base']:+.3f} vs base"
        print(f"  {name:13s} {nll:.3f}{delta}")

    required = required_criteria(args.preset)
    if args.reference_only:
        ok, line = verdict(failed, tuple(c for c in required if c >= 4))
        print(f"\ncriteria 4-6: {line} (criteria 1-3 not run)")
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
        if not passed:
            failed.add(1)
        em = None if ems[0] is None else sum(ems) / len(ems)
        print(
            f"  {task:5s} kept {mean:6.3f} (seeds {', '.join(f'{k:.3f}' for k in kept)})"
            f"  EM {fmt_em(em)}  {'PASS' if passed else 'FAIL'}"
        )

    print(
        f"\n2. each expert on the other tasks: damage <= {MAX_DAMAGE} of that task's gain,"
        f" EM drop <= {MAX_EM_DROP}"
    )
    for name in family.experts:
        others = [t for t in family.tasks if t != name]
        metrics = {t: cross[f"expert-{name}"][t] for t in others}
        fraction = kept_fraction(metrics, family, split)
        row = []
        for task in others:
            em, em0 = metrics[task]["exact_match"], base[task]["exact_match"]
            passed = -fraction[task] <= MAX_DAMAGE and (em is None or em >= em0 - MAX_EM_DROP)
            if not passed:
                failed.add(2)
            em_text = "" if em is None else f", EM {em0:.2f}->{em:.2f}"
            row.append(f"{task} {fraction[task]:+.2f}{em_text}{'' if passed else ' FAIL'}")
        print(f"  expert-{name:5s} " + "; ".join(row))

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
    if not passed:
        failed.add(3)
    print(f"  best: {best[1]} keeps {best[0]:+.2f} of every expert  {'PASS' if passed else 'FAIL'}")
    ok, line = verdict(failed, required)
    print(f"\n{line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Choose one default per merge method by the objective fixed in bench/harness/default_choice.py.

    python scripts/choose_defaults.py [--toys PRESET ...] [--out bench-out/defaults]
        [--cache .cache/mergekit-lrp] [--threads 2] [--workers 2]

Merges every candidate of ``harness.default_choice`` (lrp's and regmean's, and task
arithmetic at 1/N, 0.5 and 1 for the floor) through mergekit's real ``run_merge`` on the
validation split of every cell of the real family (the four full fine-tunes of
SmolLM2-135M-Instruct, each pair of them, the LoRA pair; docs/real-family.md) and of the
toy families named by ``--toys`` (their pairs and all their experts), with the held-out
text NLL scored on the validation windows. Prints and writes (results.json, results.md in
--out) each candidate's score per size, its floor failures, the chosen default per
method (the best that needs no file beyond the models' own: the base-holding settings
are ranked but cannot be a default), and the recommendation table: those defaults, the
base-holding settings and task arithmetic at fixed weights and at its best weight per
merge, by the same objective. A run started again with the same --out resumes from the
cells it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from harness.default_choice import (  # noqa: E402
    CANDIDATES,
    TASK_ARITHMETIC,
    ChoiceJob,
    as_method,
    at_best_weight,
    rank,
    validate,
)
from harness.jobs import PARTIAL, run_jobs, subsets_of  # noqa: E402
from harness.methods import DEFAULT_SCORES, gram_scores  # noqa: E402
from harness.real_bench import SCORES  # noqa: E402
from harness.score_sets import family_score_files  # noqa: E402
from real_family.family import LORA_PRESET, build_real_family  # noqa: E402
from real_family.gguf_base import RealBaseError  # noqa: E402


def cells(family, sizes: dict, keys: dict) -> list[ChoiceJob]:
    """Every candidate (and task arithmetic) on every subset of ``family`` that ``sizes``
    names (size label -> "all" or "pairs"); ``keys``: symbolic score set -> key."""
    candidates = [*CANDIDATES, TASK_ARITHMETIC]
    methods = [as_method(c, keys.get(c.scores)) for c in candidates if c.scores]
    files = family_score_files(family, methods, print)
    plain = replace(family)  # without its cached tokenizer: workers load their own
    return [
        ChoiceJob(plain, subset, c, keys.get(c.scores), files, size)
        for size, which in sizes.items()
        for subset in subsets_of(family.tasks, which)
        for c in candidates
    ]


def table(standings: list[dict]) -> list[str]:
    sizes = list(standings[0]["per_size"])
    lines = [
        "| candidate | score | " + " | ".join(sizes) + " | floor failures | excess (nats) |",
        "|---" * (4 + len(sizes)) + "|",
    ]
    for s in standings:
        per = " | ".join(f"{s['per_size'][k]:.3f}" for k in sizes)
        lines.append(
            f"| {s['name']} | {s['score']:.3f} | {per} | "
            f"{s['floor_failures']}/{s['cells']} | {s['excess']:.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toys", nargs="*", default=[], metavar="PRESET")
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "defaults")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        real = build_real_family(args.cache)
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    from real_family.evaluate import base_text_nll

    real_keys = {"attnlrp": SCORES, "gram": gram_scores().replace("-128", "-32")}
    four, lora = real.with_preset("smollm2"), real.with_preset(LORA_PRESET)
    for view in (four, lora):
        base_text_nll(view, "val")  # cached once here, not by each worker at once
    jobs = cells(four, {"real: four": "all", "real: pairs": "pairs"}, real_keys)
    jobs += cells(lora, {"real: LoRA pair": "all"}, real_keys)
    if args.toys:
        from toy_family import build_family

        toy_keys = {"attnlrp": DEFAULT_SCORES, "gram": gram_scores()}
        for preset in args.toys:
            toy = build_family(args.cache, preset)
            which = {f"{preset}: all": "all"}
            if len(toy.tasks) > 2:
                which[f"{preset}: pairs"] = "pairs"
            jobs += cells(toy, which, toy_keys)
    rows = run_jobs(jobs, args.out, args.workers, args.threads, False, work=validate)
    records, references = {}, {}
    for row in rows:
        cell = (row["size"], tuple(row["subset"]))
        by_weight = {float(w): r for w, r in row["records"].items()}
        if row["method"] == TASK_ARITHMETIC.name:
            references[cell] = by_weight
        else:
            records.setdefault(row["method"], {})[cell] = next(iter(by_weight.values()))
    lines, configs = [], {}
    methods = {c.name: c for c in CANDIDATES}
    for merge_method in dict.fromkeys(c.merge_method for c in CANDIDATES):
        mine = {n: r for n, r in records.items() if methods[n].merge_method == merge_method}
        standings = rank(mine, references)
        # a default needs no file beyond the models' own: the base-holding settings are
        # ranked, and go on to the recommendation, but are not the method's default
        default = next(s["name"] for s in standings if methods[s["name"]].base_weight is None)
        held = [s["name"] for s in standings if methods[s["name"]].base_weight is not None]
        configs.update({n: mine[n] for n in (default, *held)})
        lines += [f"## {merge_method}: chosen default {default}", ""]
        lines += table(standings) + [""]
    # the recommendation: each method's default and base-holding settings against task
    # arithmetic at one weight for every merge (1/N, 0.5, 1) and at its best validation
    # weight in each cell (the floor's reference, which a user cannot know beforehand)
    for label, pick in {
        "task_arithmetic (weight 1/N)": lambda ws: ws[min(ws)],
        "task_arithmetic (weight 0.5)": lambda ws: ws[0.5],
        "task_arithmetic (weight 1)": lambda ws: ws[1.0],
        "task_arithmetic (best weight per merge)": at_best_weight,
    }.items():
        configs[label] = {cell: pick(by_weight) for cell, by_weight in references.items()}
    standings = rank(configs, references)
    lines += ["## recommendation", ""] + table(standings) + [""]
    seconds = time.perf_counter() - started
    lines.append(f"{len(rows)} cells, {seconds / 60:.1f} min (threads {args.threads})")
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds}))
    (args.out / PARTIAL).unlink(missing_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The real family's acceptance criteria, checked on its test split (docs/real-family.md).

    python scripts/check_real_family.py [--cache .cache/mergekit-lrp]

1. every expert (full and LoRA) gains at least 0.5 exact match on its own skill over the base;
2. no expert reaches half of another expert's gain on that expert's skill;
3. the base reproduces its stored general-set replies (exact match 1.0);
4. the whole build took at most 45 minutes.
Prints each model's exact match per skill, its text NLL change and general-set scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from real_family.evaluate import reference  # noqa: E402
from real_family.family import LORA_PRESET, build_real_family  # noqa: E402
from real_family.gguf_base import RealBaseError  # noqa: E402

MIN_GAIN = 0.5
BUILD_MINUTES = 45


def show(ref: dict, tasks) -> None:
    skills = " | ".join(f"{t} EM" for t in tasks)
    print(f"| model | {skills} | text ΔNLL | general EM | correct |")
    print("|---" * (len(tasks) + 4) + "|")
    base_nll = ref["base"]["text"]["nll"]
    for name, m in ref.items():
        ems = " | ".join(f"{m[t]['exact_match']:.3f}" for t in tasks)
        g = m["general"]
        print(f"| {name} | {ems} | {m['text']['nll'] - base_nll:+.3f} | "
              f"{g['exact_match']:.2f} | {g['correct']:.2f} |")  # fmt: skip


def checks(ref: dict, tasks) -> list[tuple[str, bool]]:
    em = {n: {t: ref[n][t]["exact_match"] for t in tasks} for n in ref}
    gain = {t: em[f"expert-{t}"][t] - em["base"][t] for t in tasks}
    found = [(f"expert-{t} gains {gain[t]:+.3f} on {t} (>= {MIN_GAIN})", gain[t] >= MIN_GAIN)
             for t in tasks]  # fmt: skip
    for t in tasks:
        for other in tasks:
            if other != t:
                cross = em[f"expert-{t}"][other] - em["base"][other]
                found.append((
                    f"expert-{t} on {other}: {cross:+.3f} < half of {gain[other]:+.3f}",
                    cross < 0.5 * gain[other],
                ))  # fmt: skip
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    args = parser.parse_args()
    torch.set_num_threads(2)
    try:
        family = build_real_family(args.cache)
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    results = []
    for view in (family, family.with_preset(LORA_PRESET)):
        ref = reference(view, "test")
        print(f"\n{view.preset}: {', '.join(view.tasks)}\n")
        show(ref, view.tasks)
        results += checks(ref, view.tasks)
        if view is family:
            base_em = ref["base"]["general"]["exact_match"]
            results.append((f"base general-set exact match {base_em:.3f} (= 1)", base_em == 1.0))
    seconds = json.loads((family.root / "family.json").read_text())["seconds"]
    total = sum(seconds.values()) / 60
    results.append((f"build {total:.1f} min (<= {BUILD_MINUTES})", total <= BUILD_MINUTES))
    print()
    for text, ok in results:
        print(f"{'pass' if ok else 'FAIL'}  {text}")
    print("accepted" if all(ok for _, ok in results) else "not accepted")


if __name__ == "__main__":
    main()

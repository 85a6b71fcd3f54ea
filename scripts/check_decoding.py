"""Check the real family's one-pass scoring against decoding every question.

    python scripts/check_decoding.py [--cache .cache/mergekit-lrp] [--split test]

For the base, every expert (full and LoRA, folded) and the multi-task model: each skill's
exact match from ``real_family.decoding.answer_scores`` (read off one teacher-forced pass)
and from greedy decoding of every question with ``generate``, side by side, with the
time each took; exits non-zero if any pair differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from real_family.decoding import answer_scores, greedy_answers  # noqa: E402
from real_family.evaluate import load_model  # noqa: E402
from real_family.family import LORA_PRESET, build_real_family  # noqa: E402


def decoded_exact_match(model, tokenizer, examples) -> float:
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    max_new = max(len(a) for a in answers) + 1
    got = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new)
    return sum(g == e.answer for g, e in zip(got, examples, strict=True)) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = build_real_family(args.cache)
    lora = family.with_preset(LORA_PRESET)
    views = [(family, {"base": family.base, "multitask": family.multitask})]
    views[0][1].update({f"expert-{t}": p for t, p in family.expert_checkpoints.items()})
    views.append((lora, {f"expert-{t}": p for t, p in lora.expert_checkpoints.items()}))
    differ, one_pass, decoding = 0, 0.0, 0.0
    print("| model | skill | one pass | decoded |\n|---|---|---|---|")
    for view, models in views:
        for name, path in models.items():
            model = load_model(path)
            for task in view.tasks:
                examples = view.eval_examples(task, args.split)
                started = time.perf_counter()
                fast = answer_scores(model, view.tokenizer, view.task_objects[task], examples)
                middle = time.perf_counter()
                slow = decoded_exact_match(model, view.tokenizer, examples)
                one_pass += middle - started
                decoding += time.perf_counter() - middle
                differ += fast["exact_match"] != slow
                print(f"| {name} | {task} | {fast['exact_match']:.3f} | {slow:.3f} |", flush=True)
    print(
        f"\n{differ} pairs differ; one pass (NLL and exact match) {one_pass:.0f} s, "
        f"decoding (exact match only) {decoding:.0f} s"
    )
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()

"""``regmean`` holding the base (``base_scores``) on the real family: what each skill keeps
and what the base could do, over ``base_weight``.

    python scripts/check_base_gram.py [--cache .cache/mergekit-lrp] [--threads 2]
        [--weights 0.25 1 4 16] [--ridges 0.01 0.1 1]

The base's Gram file is ``lrp-compute --method gram`` (no token weighting, as the
experts' files) on the base with general prompts that no evaluation uses: the questions
of ``general-candidates.json`` that the retention set (``general.json``) does not hold,
as chats, and the first 16 windows of the held-out text's validation split (the text
figure is scored on the test split). The four full fine-tunes are merged by ``regmean``
at its defaults (the experts' Gram files of the real benchmark, computed first if
missing), plainly and with ``base_scores`` at each ``--weights``; on the test split, per
merge: each skill's kept fraction, their mean and worst, the held-out text's NLL change
against the base (nats; negative is better than the base) and the general set's exact
match and correct fractions (the base: 1.00 and its own correct fraction). The control,
``--ridges``: plain ``regmean`` with a larger ridge, which pulls the change towards the
base in every input direction alike instead of in those the base's prompts reach.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from harness.merge import configuration, run_merge  # noqa: E402
from harness.methods import merge_config  # noqa: E402
from harness.real_bench import REGMEAN  # noqa: E402
from harness.score_sets import family_score_files  # noqa: E402
from real_family.evaluate import evaluate, reference  # noqa: E402
from real_family.family import build_real_family  # noqa: E402
from real_family.general import SET, general_set  # noqa: E402
from real_family.text import windows  # noqa: E402

#: validation-split text windows in the base's calibration
TEXT_WINDOWS = 16


def base_prompts(family, out: Path) -> int:
    """Write the base's calibration prompts (JSONL); returns how many."""
    evaluated = {item["question"] for item in general_set()}
    candidates = json.loads(SET.with_name("general-candidates.json").read_text())
    questions = [q for q, _ in candidates if q not in evaluated]
    records = [{"messages": [{"role": "user", "content": q}]} for q in questions]
    for ids in windows(family.tokenizer, "val")[:TEXT_WINDOWS]:
        records.append({"text": family.tokenizer.decode(ids)})
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return len(records)


def base_gram(family, scratch: Path) -> Path:
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores

    prompts = scratch / "general.jsonl"
    count = base_prompts(family, prompts)
    out = scratch / "base-gram.safetensors"
    options = ComputeOptions(method="gram", token_weighting="none", progress=False)
    compute_scores(str(family.base), str(prompts), str(out), options)
    print(f"base Gram file from {count} general prompts", flush=True)
    return out


def scored(family, files, parameters: dict, out: Path) -> dict:
    config = merge_config(family, family.tasks, REGMEAN, None, 1.0, files)
    config["parameters"] = {**config["parameters"], **parameters}
    run_merge(configuration(config), out, 0)
    metrics = evaluate(out, family, "test", True)
    shutil.rmtree(out)
    return metrics


def row(label: str, metrics: dict, tasks) -> str:
    kept = [metrics[t]["kept"] for t in tasks]
    cells = " | ".join(f"{k:.3f}" for k in kept)
    general = metrics["general"]
    return (
        f"| {label} | {cells} | {statistics.mean(kept):.3f} | {min(kept):.3f} | "
        f"{metrics['text']['delta']:+.3f} | {general['exact_match']:.2f} | "
        f"{general['correct']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0])
    parser.add_argument("--ridges", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = build_real_family(args.cache).with_preset("smollm2")
    files = family_score_files(family, [REGMEAN], print)
    scratch = Path(tempfile.mkdtemp(prefix="base-gram-"))
    try:
        held = base_gram(family, scratch)
        tasks = family.tasks
        base = reference(family, "test")["base"]["general"]
        lines = [
            "| merge | " + " | ".join(f"{t} kept" for t in tasks)
            + " | mean | worst | text NLL change | general exact match | general correct |",
            "|---" * (6 + len(tasks)) + "|",
            f"| base | {' | '.join('0' for _ in tasks)} | 0 | 0 | +0.000 | "
            f"{base['exact_match']:.2f} | {base['correct']:.2f} |",
        ]  # fmt: skip
        lines.append(row("regmean", scored(family, files, {}, scratch / "m"), tasks))
        print("regmean scored", flush=True)
        for weight in args.weights:
            parameters = {"base_scores": str(held), "base_weight": weight}
            metrics = scored(family, files, parameters, scratch / "m")
            lines.append(row(f"regmean, base_weight {weight:g}", metrics, tasks))
            print(f"base_weight {weight:g} scored", flush=True)
        for ridge in args.ridges:
            metrics = scored(family, files, {"ridge": ridge}, scratch / "m")
            lines.append(row(f"regmean, ridge {ridge:g} (control)", metrics, tasks))
            print(f"ridge {ridge:g} scored", flush=True)
        print("\n".join(lines))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

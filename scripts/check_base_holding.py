"""Holding the base (``base_scores``) on the real family: what each skill keeps and what
the base could do, over ``base_weight``, for ``regmean`` or ``lrp``.

    python scripts/check_base_holding.py [--method regmean|lrp] [--cache .cache/mergekit-lrp]
        [--threads 2] [--weights 0.25 1 4 16] [--ridges 0.01 0.1 1]

The base's own file is ``lrp-compute`` on the base with general prompts that no
evaluation reads (``real_family.general.write_base_calibration``: the general questions
the retention set leaves out, as chats, and validation-split windows of the held-out
text). The four full fine-tunes are merged at the method's defaults, plainly and with
``base_scores`` at each ``--weights``; on the test split, per merge: each skill's kept
fraction, their mean and worst, the held-out text's NLL change against the base (nats;
negative is better) and the general set's exact match and correct fractions.

* ``regmean``: the base's Gram file (``--method gram``, no token weighting, as the
  experts'); the control, ``--ridges``: plain ``regmean`` with a larger ridge, which
  pulls the change towards the base in every input direction alike.
* ``lrp``: the base's AttnLRP relevance (the experts' target, ``predicted``) and, as
  controls, its Fisher scores, |theta_base| alone (scores of 1) and seeded uniform random
  scores, each at every weight.
"""

from __future__ import annotations

import argparse
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
from harness.real_bench import DEFAULTS as LRP  # noqa: E402
from harness.real_bench import REGMEAN  # noqa: E402
from harness.score_sets import family_score_files, random_scores  # noqa: E402
from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY  # noqa: E402
from real_family.evaluate import evaluate, reference  # noqa: E402
from real_family.family import build_real_family  # noqa: E402
from real_family.general import write_base_calibration  # noqa: E402

#: lrp-compute's options for each base score file of ``--method lrp`` (None: written here)
LRP_BASE_SIGNALS = {
    "AttnLRP relevance": {"method": "attnlrp", "target": "predicted"},
    "Fisher (control)": {"method": "fisher", "target": "predicted"},
    "|theta_base| (control)": None,
    "random (control)": None,
}


def base_file(family, scratch: Path, label: str, options: dict | None) -> Path:
    """The base's own score file for one signal, from the general calibration prompts."""
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores

    out = scratch / f"base-{len(list(scratch.glob('base-*')))}.safetensors"
    if label.startswith("random"):
        random_scores(family.base, out, seed=0)
    elif label.startswith("|theta_base|"):
        ones_scores(family.base, out)
    else:
        prompts = scratch / "general.jsonl"
        count = write_base_calibration(family.tokenizer, prompts)
        compute_scores(str(family.base), str(prompts), str(out),
                       ComputeOptions(**options, progress=False))  # fmt: skip
        print(f"base {label} from {count} general prompts", flush=True)
    return out


def ones_scores(model_dir: Path, out: Path) -> None:
    """Scores of 1 (plus 1e-6 of seeded noise, since constant scores are refused as
    ranking nothing): importance is then |theta_base| alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    random_scores(model_dir, out, seed=1)
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {name: 1 + 1e-6 * value for name, value in load_file(out).items()}
    save_file(tensors, str(out), metadata=metadata)


def scored(family, method, density, files, parameters: dict, out: Path) -> dict:
    config = merge_config(family, family.tasks, method, density, 1.0, files)
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
    parser.add_argument("--method", choices=("regmean", "lrp"), default="regmean")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "mergekit-lrp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 1.0, 4.0, 16.0])
    parser.add_argument("--ridges", type=float, nargs="*", default=[0.01, 0.1, 1.0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    family = build_real_family(args.cache).with_preset("smollm2")
    method, density = (REGMEAN, None) if args.method == "regmean" else (LRP, DEFAULT_DENSITY)
    files = family_score_files(family, [method], print)
    scratch = Path(tempfile.mkdtemp(prefix="base-holding-"))
    tasks = family.tasks

    def measure(label: str, parameters: dict) -> None:
        lines.append(row(label, scored(family, method, density, files, parameters,
                                       scratch / "m"), tasks))  # fmt: skip
        print(f"{label} scored", flush=True)

    try:
        base = reference(family, "test")["base"]["general"]
        lines = [
            "| merge | " + " | ".join(f"{t} kept" for t in tasks)
            + " | mean | worst | text NLL change | general exact match | general correct |",
            "|---" * (6 + len(tasks)) + "|",
            f"| base | {' | '.join('0' for _ in tasks)} | 0 | 0 | +0.000 | "
            f"{base['exact_match']:.2f} | {base['correct']:.2f} |",
        ]  # fmt: skip
        measure(args.method, {})
        if args.method == "regmean":
            held = base_file(family, scratch, "Gram", {"method": "gram", "token_weighting": "none"})
            for weight in args.weights:
                measure(f"regmean, base_weight {weight:g}",
                        {"base_scores": str(held), "base_weight": weight})  # fmt: skip
            for ridge in args.ridges:
                measure(f"regmean, ridge {ridge:g} (control)", {"ridge": ridge})
        else:
            for label, options in LRP_BASE_SIGNALS.items():
                held = base_file(family, scratch, label, options)
                for weight in args.weights:
                    measure(f"lrp, base {label}, base_weight {weight:g}",
                            {"base_scores": str(held), "base_weight": weight})  # fmt: skip
        print("\n".join(lines))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

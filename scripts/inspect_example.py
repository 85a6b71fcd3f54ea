"""The README's lrp-inspect example, on the toy family (no downloads):

build or reuse the family -> lrp-compute on two experts (rev, sort) with prompts of
their own task -> lrp-inspect over both score files with their models and the base ->
the plots copied to docs/img/.

    python scripts/inspect_example.py [--preset tiny] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-out" / "inspect"
TASKS = ("rev", "sort")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="toy family preset (docs/toy-family.md)")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    parser.add_argument("--prompts", type=int, default=32, help="calibration prompts per expert")
    parser.add_argument("--density", type=float, default=0.3)
    args = parser.parse_args()

    from mergekit_lrp.inspect.cli import inspect_files, render
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import compute_scores
    from toy_family import build_family

    family = build_family(Path(args.cache), preset=args.preset, progress=True)
    WORK.mkdir(parents=True, exist_ok=True)
    scores, models = [], []
    for task in TASKS:
        prompts = WORK / f"{task}.jsonl"
        lines = family.calibration_prompts(task, args.prompts)
        prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in lines))
        output = WORK / f"expert-{task}.safetensors"
        options = ComputeOptions(overwrite=True, progress=False)
        compute_scores(str(family.experts[task]), str(prompts), str(output), options)
        scores.append(str(output))
        models.append(str(family.experts[task]))
    report = inspect_files(scores, models, str(family.base), args.density, "delta", WORK / "plots")
    print(render(report))
    image_dir = REPO / "docs" / "img"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in ("expert-rev-relevance.png", "expert-rev-keep.png", "compare.png"):
        shutil.copy(WORK / "plots" / name, image_dir / f"inspect-{name}")
        print(f"copied {name} to docs/img/inspect-{name}")


if __name__ == "__main__":
    main()

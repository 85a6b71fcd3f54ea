"""How much of each expert's task vector a selection keeps, by |delta| mass.

For every expert of a built toy family and every 2-D tensor lrp ranks (protected tensors
excluded), the mask ``merge_mask`` gives for one (importance, density) setting, and the
share of the task vector it keeps: sum |delta| over kept entries / sum |delta| (L1), and
the same for delta squared (L2²). Top-k by |delta| alone is printed beside it.

    python scripts/kept_delta_mass.py --family llama-4x:3 --density 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

from mergekit_lrp import merge_mask, read_scores  # noqa: E402
from mergekit_lrp.merging.tensor_names import is_protected  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update({name: t.float() for name, t in load_file(path).items()})
    return found


def kept_shares(base, expert, scores, importance: str, density: float) -> tuple[float, float]:
    kept_l1 = total_l1 = kept_l2 = total_l2 = 0.0
    scored = scores.names()  # a copy per call: read once
    for name, theta in expert.items():
        if theta.ndim != 2 or is_protected(name, theta.ndim) or name not in scored:
            continue
        delta = theta - base[name]
        if importance == "magnitude":
            mask = merge_mask(base[name], theta, None, density, "delta", selection="topk",
                              name=name)
        else:
            mask = merge_mask(base[name], theta, scores.get(name), density, importance,
                              selection="topk", name=name)
        kept_l1 += delta.abs()[mask].sum().item()
        total_l1 += delta.abs().sum().item()
        kept_l2 += delta.square()[mask].sum().item()
        total_l2 += delta.square().sum().item()
    return kept_l1 / total_l1, kept_l2 / total_l2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llama-4x:3", help="NAME:SEED of a built family")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--scores", default="predicted-128", help="score set of the family")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    args = parser.parse_args()

    from toy_family import build_family

    preset, seed = args.family.split(":")
    family = build_family(Path(args.cache), preset=preset, seed=int(seed), progress=False)
    base = tensors(family.base)
    print(f"{args.family}, top-k at density {args.density}: kept share of each task vector")
    print("| expert | ranked by | kept \\|Δ\\| (L1) | kept Δ² (L2²) |")
    print("|---|---|---|---|")
    for task, folder in family.experts.items():
        files = sorted(family.root.glob(f"scores-*/{task}-{args.scores}.safetensors"))
        if not files:
            raise SystemExit(f"no {task}-{args.scores}.safetensors under {family.root}")
        scores = read_scores(files[0])
        expert = tensors(Path(folder))
        for importance, label in (("weight", "|θ|·relevance"), ("delta", "|Δ|·relevance"),
                                  ("magnitude", "|Δ|")):
            l1, l2 = kept_shares(base, expert, scores, importance, args.density)
            print(f"| {task} | {label} | {l1:.3f} | {l2:.3f} |")


if __name__ == "__main__":
    main()

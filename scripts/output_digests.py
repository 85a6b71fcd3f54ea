"""SHA-256 of what users get: score files from `lrp-compute` and merges from `mergekit-yaml`.

    python scripts/output_digests.py [--work DIR]

Builds tiny seeded checkpoints (Llama, Qwen3, Gemma2 and a Qwen3-Next with MoE experts,
whose scores go through transformers' weight conversion), scores each fine-tune with the
`lrp-compute` command, merges with `lrp` and `circuit` through the `mergekit-yaml` command
in several option settings (`--random-seed 0`: the default selection draws), and prints
one digest per file. Run it before and after a refactor that must not change behaviour:
the two printouts must be identical (same torch version). Score files record the paths
they were computed from, so both runs must use the same --work directory (the default is
a fixed one, emptied first).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny model builders

from checkpoints import char_tokenizer  # noqa: E402
from tiny_models import make_tiny_hybrid, make_tiny_model  # noqa: E402

BIN = Path(sys.executable).parent
VOCAB = len(char_tokenizer())
PROMPTS = ["def add(a, b): return a + b", "the quick brown fox", "12 + 30 = 42", "sort 3 1 2"]
KINDS = ("llama", "qwen3", "gemma2", "qwen3_next")
MERGES = {  # label -> (merge method, parameters)
    "defaults": ("lrp", {}),
    "weight-ties": ("lrp", {"importance": "weight", "consensus": "sum", "normalize": True}),
    "rescale-dense": ("lrp", {"density": 0.7, "rescale": True, "protect_special": False}),
    "topk-budget": ("lrp", {"selection": "topk", "consensus": "none", "budget": "layer"}),
    "circuit-scores": ("circuit", {"drop_order": "scores", "epsilon": 0.2}),
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fine_tune(model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * 0.05 * parameter.abs().mean())
    return model


def build(kind: str, root: Path) -> dict[str, Path]:
    builder = make_tiny_hybrid if kind == "qwen3_next" else make_tiny_model
    paths = {}
    for name, seed in (("base", None), ("ft_a", 1), ("ft_b", 2)):
        model = builder(kind, seed=0, vocab_size=VOCAB)
        if seed is not None:
            fine_tune(model, seed)
        model.save_pretrained(root / name)
        char_tokenizer().save_pretrained(root / name)
        paths[name] = root / name
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_work = Path(tempfile.gettempdir()) / "mergekit-lrp-digests"
    parser.add_argument(
        "--work", default=str(default_work), help="where the files go (emptied first)"
    )
    parser.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS)
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    prompts = work / "prompts.txt"
    work.mkdir(parents=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for kind in args.kinds:
        models = build(kind, work / kind)
        for target in ("predicted", "next-token"):
            for name in ("ft_a", "ft_b"):
                out = work / kind / f"{name}-{target}.safetensors"
                subprocess.run(
                    [
                        BIN / "lrp-compute",
                        models[name],
                        "--prompts",
                        prompts,
                        "--output",
                        out,
                        "--target",
                        target,
                        "--quiet",
                        "--overwrite",
                    ],
                    check=True,
                    capture_output=True,
                )
                print(f"{kind} scores {name} {target}: {digest(out)}")
        for label, (method, parameters) in MERGES.items():
            if kind == "qwen3_next" and method == "circuit":
                continue  # circuit has no missing_scores, and MoE routers get no relevance
            shared = {"density": 0.4} if method == "lrp" else {}
            if kind == "qwen3_next":  # MoE routers get no relevance
                shared["missing_scores"] = "magnitude"
            config = {
                "merge_method": method,
                "base_model": str(models["base"]),
                "parameters": {**shared, **parameters},
                "models": [
                    {
                        "model": str(models[name]),
                        "parameters": {
                            "lrp_scores": str(work / kind / f"{name}-predicted.safetensors")
                        },
                    }
                    for name in ("ft_a", "ft_b")
                ],
                "dtype": "float32",
            }
            config_path = work / kind / f"merge-{label}.yml"
            config_path.write_text(yaml.safe_dump(config))
            out = work / kind / f"merged-{label}"
            subprocess.run(
                [BIN / "mergekit-yaml", config_path, out, "--allow-crimes", "--random-seed", "0"],
                check=True,
                capture_output=True,
            )
            files = sorted(out.glob("*.safetensors"))
            combined = hashlib.sha256(b"".join(digest(f).encode() for f in files)).hexdigest()
            print(f"{kind} merge {label}: {combined[:16]}")


if __name__ == "__main__":
    main()

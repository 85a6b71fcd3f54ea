"""The main job end to end, on the toy family (no downloads):

build or reuse the family -> `lrp-compute` on every expert -> `mergekit-yaml` with
examples/toy-demo-lrp.yml (lrp's defaults), examples/toy-demo-task-arithmetic.yml (the
recommended config: the task vectors averaged) and examples/toy-demo-dare-ties.yml ->
evaluate -> comparison.
The examples name the default family's two experts; for a family with other experts
(``--preset llama-4x``) the demo writes the same configs over all of them.

    python scripts/demo.py [--preset llama-a] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # toy_family

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-out"
BIN = Path(sys.executable).parent
CONFIGS = {
    "lrp": REPO / "examples" / "toy-demo-lrp.yml",
    "task_arithmetic": REPO / "examples" / "toy-demo-task-arithmetic.yml",
    "dare_ties": REPO / "examples" / "toy-demo-dare-ties.yml",
}


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run(*command: str) -> None:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=REPO)


def config_for(example: Path, tasks: list[str]) -> Path:
    """``example`` itself when it merges exactly the family's experts; else the same config
    with one entry per expert (the first entry with its expert's and score file's task
    replaced), written under demo-out/configs."""
    import yaml

    config = yaml.safe_load(example.read_text())
    first = config["models"][0]
    named = [Path(m["model"]).name.removeprefix("expert-") for m in config["models"]]
    if named == list(tasks):
        return example
    template = json.dumps(first)
    config["models"] = [
        json.loads(
            template.replace(f"expert-{named[0]}", f"expert-{task}").replace(
                f"/{named[0]}.safetensors", f"/{task}.safetensors"
            )
        )
        for task in tasks
    ]
    out = WORK / "configs" / example.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default="llama-a", help="toy family preset (docs/toy-family.md)"
    )
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    parser.add_argument("--prompts", type=int, default=64, help="calibration prompts per expert")
    args = parser.parse_args()

    from toy_family import build_family, evaluate_model, kept_fraction

    step(f"toy family ({args.preset} preset; built once, then reused from {args.cache})")
    family = build_family(Path(args.cache), preset=args.preset, progress=True)
    WORK.mkdir(exist_ok=True)
    link = WORK / "family"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(family.root.resolve(), target_is_directory=True)

    step("relevance scores: lrp-compute on each expert, with prompts of its own task")
    (WORK / "prompts").mkdir(exist_ok=True)
    (WORK / "scores").mkdir(exist_ok=True)
    for task in family.tasks:
        prompts = WORK / "prompts" / f"{task}.jsonl"
        lines = family.calibration_prompts(task, args.prompts)
        prompts.write_text("".join(json.dumps({"text": p}) + "\n" for p in lines))
        run(
            BIN / "lrp-compute",
            f"demo-out/family/expert-{task}",
            "--prompts",
            prompts,
            "--output",
            f"demo-out/scores/{task}.safetensors",
            "--overwrite",
        )

    step("merges: plain mergekit-yaml")
    for name, example in CONFIGS.items():
        config = config_for(example, family.tasks)
        run(
            BIN / "mergekit-yaml",
            config.relative_to(REPO),
            f"demo-out/merged-{name}",
            "--random-seed",
            "0",
        )

    step("evaluation on the test split")
    rows = {
        "base": family.base,
        "multitask": family.multitask,
        **{name: WORK / f"merged-{name}" for name in CONFIGS},
    }
    table = {}
    for name, path in rows.items():
        metrics = evaluate_model(path, family, split="test")
        kept = kept_fraction(metrics, family, split="test")
        table[name] = {t: (kept[t], metrics[t]["exact_match"]) for t in family.tasks}
    header = "| model | " + " | ".join(family.tasks) + " | mean kept |"
    print("\nkept fraction of each expert's answer-NLL improvement (exact match)\n")
    print(header)
    print("|---" * (len(family.tasks) + 2) + "|")
    for name, cells in table.items():
        shown = [
            f"{k:.2f}" + (f" ({em:.2f})" if em is not None else "") for k, em in cells.values()
        ]
        mean = statistics.mean(k for k, _ in cells.values())
        print(f"| {name} | " + " | ".join(shown) + f" | {mean:.3f} |")
    means = {n: statistics.mean(k for k, _ in table[n].values()) for n in CONFIGS}
    dare = means["dare_ties"]
    for name, label in (("lrp", "lrp at its defaults"), ("task_arithmetic", "task_arithmetic")):
        lead = means[name] - dare
        print(
            f"\n{label} keeps {means[name]:.3f} of the experts' improvement on average, "
            f"dare_ties {dare:.3f} ({name if lead > 0 else 'dare_ties'} ahead by {abs(lead):.3f})"
        )
    print("The full comparison is docs/BENCHMARKS.md.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

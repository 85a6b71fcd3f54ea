"""A merged model scored on a family: the kept fraction of each expert's gain on its skill,
and how much of the base's held-out text ability it keeps.

Retention (of the text domain every family's base is trained on and every fine-tune
replays): r = (NLL_worst − NLL_merged) / (NLL_worst − NLL_base) on held-out text windows,
NLL_worst the text NLL of the expert that lost most of it. 1 is the base's text ability,
0 as bad as the worst expert, above 1 better than the base, below 0 worse than any expert.
A family whose experts barely change the text NLL (a gap under 0.01 nats) has no
retention: the ratio would be noise.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

#: text-NLL gaps (nats) below this make retention undefined for the family
MIN_TEXT_GAP = 0.01


def evaluate(
    model_dir: Path, family, split: str, exact: bool, tasks=None, text: bool = False
) -> dict[str, dict]:
    """Per task of ``tasks`` (default: all): kept fraction, and exact match when asked;
    under ``"text"``, the held-out text NLL and retention when the family has text. The
    real family scores itself (:func:`real_family.evaluate.evaluate`), its text on the
    validation split only when ``text`` asks."""
    if getattr(family, "real", False):
        from real_family.evaluate import evaluate as evaluate_real

        return evaluate_real(model_dir, family, split, exact, tasks, text)
    from transformers import AutoModelForCausalLM

    from toy_family import kept_fraction
    from toy_family.evaluate import answer_nll, score_task

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    metrics = {}
    for task in tasks or family.tasks:
        examples = family.eval_examples(task, split)
        task_object = family.task_objects[task]
        if exact:
            metrics[task] = score_task(model, family.tokenizer, task_object, examples)
        else:
            metrics[task] = {
                "answer_nll": answer_nll(model, family.tokenizer, task_object, examples),
                "exact_match": None,
            }
    kept = kept_fraction(metrics, family, split)
    result = {t: {"kept": kept[t], "exact_match": metrics[t]["exact_match"]} for t in metrics}
    if has_text(family):
        nll = text_nll(model, family, split)
        result["text"] = {"nll": nll, "retention": retention(nll, family, split)}
    return result


def has_text(family) -> bool:
    return "text" in family.recipe.base_rows and "text" not in family.tasks


def text_nll(model, family, split: str) -> float:
    from toy_family.evaluate import answer_nll

    task = family.task_objects["text"]
    return answer_nll(model, family.tokenizer, task, family.eval_examples("text", split))


def reference_text(family, split: str) -> dict[str, float]:
    """Held-out text NLL of the base and of each expert, cached in the family."""
    from transformers import AutoModelForCausalLM

    path = family.root / "metrics" / f"reference-text-{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    found = {}
    for name, model_dir in {"base": family.base, **family.experts}.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        found[name] = text_nll(model, family, split)
    path.parent.mkdir(exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(found, indent=2))
    os.replace(scratch, path)
    return found


def retention(nll: float, family, split: str) -> float | None:
    """See the module doc; None when the experts leave the text as the base has it."""
    reference = reference_text(family, split)
    worst = max(v for name, v in reference.items() if name != "base")
    gap = worst - reference["base"]
    if gap < MIN_TEXT_GAP:
        return None
    return (worst - nll) / gap


def subset_mean(metrics: dict, subset) -> float:
    """The mean kept fraction over the tasks of ``subset``."""
    return statistics.mean(metrics[t]["kept"] for t in subset)


def subset_worst(metrics: dict, subset) -> float:
    """The smallest kept fraction over the tasks of ``subset``."""
    return min(metrics[t]["kept"] for t in subset)

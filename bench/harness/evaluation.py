"""A merged model scored on a family's tasks: the kept fraction of each expert's gain."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch


def evaluate(model_dir: Path, family, split: str, exact: bool, tasks=None) -> dict[str, dict]:
    """Per task of ``tasks`` (default: all): kept fraction, and exact match when asked."""
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
    return {t: {"kept": kept[t], "exact_match": metrics[t]["exact_match"]} for t in metrics}


def subset_mean(metrics: dict, subset) -> float:
    """The mean kept fraction over the tasks of ``subset``."""
    return statistics.mean(metrics[t]["kept"] for t in subset)

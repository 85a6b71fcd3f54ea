"""Scoring a model on the real family: each skill, and what the base could already do.

Per skill: the kept fraction of its expert's gain in answer NLL (1 = the expert, 0 = the
base) and, on the test split, exact match of the greedy answer. What the base could do,
measured against the base alone so it is always defined:

* ``text``: NLL per token of held-out English text (``real_family.text``) and its change
  from the base's (``delta``, nats; negative is better than the base);
* ``general``: a set of general instructions the base answers correctly
  (``real_family.general``): ``exact_match``, the fraction answered exactly as the base
  answered (its replies were checked by hand and stored), and ``correct``, the fraction
  whose reply still contains the checked answer.

The base's and the experts' figures are computed once per split and cached in the family.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from real_family.decoding import answer_scores
from real_family.general import general_scores
from real_family.text import text_nll


def load_model(path):
    from transformers import AutoModelForCausalLM

    from toy_family.train import quiet_transformers

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def raw_metrics(model, family, split: str, exact: bool, tasks, text: bool = False) -> dict:
    """Answer NLL per skill of ``tasks``; with ``exact`` (the test split's scoring) also
    each skill's exact match and the text and general figures. The validation split
    chooses each row's weight by the skills alone, so it skips the text, the most costly
    figure of a merge's scoring, unless ``text`` asks for it (choosing a default)."""
    metrics = {}
    for task in tasks:
        examples = family.eval_examples(task, split)
        scores = answer_scores(model, family.tokenizer, family.task_objects[task], examples)
        metrics[task] = {**scores, "exact_match": scores["exact_match"] if exact else None}
    if exact or text:
        metrics["text"] = {"nll": text_nll(model, family.tokenizer, split)}
    if exact:
        metrics["general"] = general_scores(model, family.tokenizer)
    return metrics


def reference(family, split: str) -> dict:
    """The base and every expert of ``family``'s view on every skill of the view (and the
    multi-task model beside all the full fine-tunes); cached per view."""
    view = family.preset if family.skills is None else "-".join(family.tasks)
    path = family.root / "metrics" / f"{view}-reference-{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    models = {"base": family.base}
    models.update({f"expert-{t}": p for t, p in family.expert_checkpoints.items()})
    if family.preset == "smollm2" and family.skills is None:
        models["multitask"] = family.multitask
    found = {
        name: raw_metrics(load_model(p), family, split, split == "test", family.tasks)
        for name, p in models.items()
    }
    path.parent.mkdir(exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(found, indent=2))
    os.replace(scratch, path)
    return found


def base_text_nll(family, split: str) -> float:
    """The base's held-out text NLL on ``split`` (the test reference holds it; the
    validation one is computed once and cached beside it)."""
    ref = reference(family, split)
    if "text" in ref["base"]:
        return ref["base"]["text"]["nll"]
    path = family.root / "metrics" / f"base-text-{split}.json"
    if not path.exists():
        nll = text_nll(load_model(family.base), family.tokenizer, split)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps({"nll": nll}))
        os.replace(scratch, path)
    return json.loads(path.read_text())["nll"]


def evaluate(model_dir: Path, family, split: str, exact: bool, tasks=None, text=False) -> dict:
    """What :func:`harness.evaluation.evaluate` returns, for the real family: per skill
    ``kept`` and ``exact_match``; ``text`` (nll, delta) and ``general``."""
    tasks = tasks or family.tasks
    metrics = raw_metrics(load_model(model_dir), family, split, exact, tasks, text)
    return scored(metrics, family, split, tasks)


def scored(metrics: dict, family, split: str, tasks) -> dict:
    ref = reference(family, split)
    result = {}
    for task in tasks:
        base = ref["base"][task]["answer_nll"]
        expert = ref[f"expert-{task}"][task]["answer_nll"]
        result[task] = {
            "kept": (base - metrics[task]["answer_nll"]) / (base - expert),
            "exact_match": metrics[task]["exact_match"],
        }
    if "text" in metrics:
        nll = metrics["text"]["nll"]
        delta = nll - base_text_nll(family, split)
        result["text"] = {"nll": nll, "delta": delta, "retention": None}
    if "general" in metrics:
        result["general"] = metrics["general"]
    return result

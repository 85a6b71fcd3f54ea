"""Scoring: teacher-forced answer NLL and exact match of greedily decoded answers."""

import json
import os
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from toy_family.tasks import Example, Task
from toy_family.train import collate, encode, quiet_transformers

if TYPE_CHECKING:
    from toy_family.family import Family


@torch.no_grad()
def answer_nll(
    model, tokenizer, task: Task, examples: list[Example], batch_size: int = 256
) -> float:
    """Mean NLL per scored token (answer and EOS for skills, every token for text)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = [
            encode(e, task, tokenizer, answer_only=True)
            for e in examples[start : start + batch_size]
        ]
        ids, labels = collate(rows, tokenizer.pad_token_id)
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((targets != -100).sum())
    return total / count


@torch.no_grad()
def greedy_answers(
    model, tokenizer, prompts: list[str], max_new: int, batch_size: int = 256
) -> list[str]:
    """Greedy continuations up to EOS (at most ``max_new`` tokens), prompts batched by length."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for _, group in groupby(order, key=lambda i: len(encoded[i])):
        group = list(group)
        for start in range(0, len(group), batch_size):
            index = group[start : start + batch_size]
            ids = torch.tensor([encoded[i] for i in index])
            generated = greedy_tokens(model, ids, max_new)
            for i, row in zip(index, generated.tolist(), strict=True):
                if tokenizer.eos_token_id in row:
                    answers[i] = tokenizer.decode(row[: row.index(tokenizer.eos_token_id)])
                else:
                    answers[i] = tokenizer.decode(row) + "\ufffd"  # never terminated: not exact
    return answers


def greedy_tokens(model, ids: torch.Tensor, max_new: int) -> torch.Tensor:
    """``max_new`` greedy tokens after equal-length prompts ``ids``, using the KV cache."""
    out = model(input_ids=ids, use_cache=True)
    new = []
    for _ in range(max_new):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(new, dim=1)


def score_task(model, tokenizer, task: Task, examples: list[Example]) -> dict[str, float | None]:
    nll = answer_nll(model, tokenizer, task, examples)
    if not task.exact:
        return {"exact_match": None, "answer_nll": nll}
    max_new = max(len(e.answer) for e in examples) + 1
    answers = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new)
    exact = sum(a == e.answer for a, e in zip(answers, examples, strict=True)) / len(examples)
    return {"exact_match": exact, "answer_nll": nll}


def _load(model_or_path):
    from transformers import AutoModelForCausalLM

    if isinstance(model_or_path, str | Path):
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    else:
        model = model_or_path
    return model.eval()


def evaluate_model(
    model_or_path, family: "Family", split: str = "val", tasks=None
) -> dict[str, dict[str, float | None]]:
    """Per task: ``exact_match`` (None for the text domain) and ``answer_nll``."""
    model = _load(model_or_path)
    tokenizer = family.tokenizer
    return {
        name: score_task(
            model, tokenizer, family.task_objects[name], family.eval_examples(name, split)
        )
        for name in (tasks or family.tasks)
    }


def _cached(path: Path, compute):
    """``compute()``'s JSON-able result, stored at ``path`` the first time (atomically)."""
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(result, indent=2))
    os.replace(scratch, path)
    return result


def reference_metrics(family: "Family", split: str) -> dict[str, dict[str, dict]]:
    """Metrics of the base and of each expert on its own task, cached in the family."""

    def compute():
        metrics = {"base": evaluate_model(family.base, family, split)}
        for name, expert in family.experts.items():
            metrics[f"expert-{name}"] = evaluate_model(expert, family, split, tasks=[name])
        return metrics

    return _cached(family.root / "metrics" / f"reference-{split}.json", compute)


def expert_metrics(family: "Family", split: str) -> dict[str, dict[str, dict]]:
    """Metrics of each expert (``expert-<task>``) on every task of the family, cached."""

    def compute():
        return {
            f"expert-{name}": evaluate_model(expert, family, split)
            for name, expert in family.experts.items()
        }

    return _cached(family.root / "metrics" / f"experts-{split}.json", compute)


def text_nll(family: "Family", split: str = "test") -> dict[str, float]:
    """NLL per token of the base, each expert and the multi-task model on the text domain's
    held-out windows (every family's base mixture has the text), cached."""

    def compute():
        models = {"base": family.base, **{f"expert-{t}": p for t, p in family.experts.items()}}
        models["multitask"] = family.multitask
        return {
            name: evaluate_model(path, family, split, tasks=["text"])["text"]["answer_nll"]
            for name, path in models.items()
        }

    return _cached(family.root / "metrics" / f"text-{split}.json", compute)


def kept_fraction(metrics, family: "Family", split: str = "val") -> dict[str, float]:
    """Per task: (NLL_base - NLL_model) / (NLL_base - NLL_expert) on the answer tokens.

    1 means the model matches the task's expert, 0 the base; negative is worse than base.
    """
    reference = reference_metrics(family, split)
    kept = {}
    for name, scores in metrics.items():
        base = reference["base"][name]["answer_nll"]
        expert = reference[f"expert-{name}"][name]["answer_nll"]
        kept[name] = (base - scores["answer_nll"]) / (base - expert)
    return kept

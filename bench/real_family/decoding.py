"""Answer NLL and greedy answers on the real model, batched for a 2-core CPU.

The toy families' helpers (``toy_family.evaluate``) decode one group of equal-length
prompts at a time and compute logits at every position; on a 135M model with a 49k
vocabulary both dominate an evaluation. Here greedy decoding pads prompts on the left
(with an attention mask, through ``generate``) so a whole set decodes in one loop that
stops when every answer has ended, and the answer NLL applies the output layer only at
the scored positions.
"""

from __future__ import annotations

import torch

from toy_family.train import collate, encode

#: what an answer that never ended is suffixed with, so it never matches exactly
UNFINISHED = "\ufffd"


@torch.no_grad()
def answer_nll(model, tokenizer, task, examples, batch: int = 64) -> float:
    """Mean NLL per scored token (the answer and its end-of-turn token)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        rows = [
            encode(e, task, tokenizer, answer_only=True) for e in examples[start : start + batch]
        ]
        ids, labels = collate(rows, tokenizer.pad_token_id)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        logits = model.lm_head(hidden[scored]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[scored], reduction="sum").item()
        count += int(scored.sum())
    return total / count


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new: int, batch: int = 64):
    """Greedy continuations of ``prompts`` up to the end of turn (at most ``max_new``
    tokens); an unfinished one ends in :data:`UNFINISHED`."""
    eos = tokenizer.eos_token_id
    answers = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch):
            inputs = tokenizer(
                prompts[start : start + batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            out = model.generate(
                **inputs,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row in out[:, inputs["input_ids"].shape[1] :].tolist():
                if eos in row:
                    answers.append(tokenizer.decode(row[: row.index(eos)]))
                else:
                    answers.append(tokenizer.decode(row) + UNFINISHED)
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(model, tokenizer, task, examples) -> float:
    """The fraction of greedy answers equal to the expected ones."""
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    max_new = max(len(a) for a in answers) + 1
    got = greedy_answers(model, tokenizer, [e.prompt for e in examples], max_new)
    return sum(g == e.answer for g, e in zip(got, examples, strict=True)) / len(examples)

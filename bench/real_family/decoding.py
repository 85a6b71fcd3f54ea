"""Answer NLL, exact match and greedy answers on the real model, batched for a 2-core CPU.

Every chat of a skill starts with the same system prompt and turn header (about 27 of its
45 tokens), so :func:`answer_scores` runs that prefix once and the rest of each chat on a
copy of its key/value cache, applying the output layer only at the scored positions. Exact
match comes from the same pass: greedy decoding reproduces an answer exactly when every
answer token, and the end-of-turn token after it, is the most likely token given the
answer's own prefix (teacher forcing follows the greedy path for as long as they agree).
Free-form replies (the general set) decode with ``generate``, left-padded so a whole set
decodes in one loop that stops when every reply has ended.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import DynamicCache

from toy_family.train import collate, encode

#: what an answer that never ended is suffixed with, so it never matches exactly
UNFINISHED = "\ufffd"


@torch.no_grad()
def answer_scores(model, tokenizer, task, examples, batch: int = 64) -> dict[str, float]:
    """``answer_nll``: mean NLL per scored token (the answer and its end-of-turn token);
    ``exact_match``: the fraction of examples whose greedy answer is the expected text."""
    if not task.exact:
        raise ValueError(f"task {task.name!r} has no end-of-answer token to match exactly")
    rows = [encode(e, task, tokenizer, answer_only=True) for e in examples]
    # keep the last prompt token out of the prefix: it predicts the first answer token
    first_scored = min(next(i for i, t in enumerate(labels) if t != -100) for _, labels in rows)
    width = min(len(os.path.commonprefix([ids for ids, _ in rows])), first_scored - 1)
    prefix = DynamicCache(config=model.config)
    model.model(input_ids=torch.tensor([rows[0][0][:width]]), cache=prefix, use_cache=True)
    total, count, predicted = 0.0, 0, []
    for start in range(0, len(rows), batch):
        chunk = [(ids[width:], labels[width:]) for ids, labels in rows[start : start + batch]]
        ids, labels = collate(chunk, tokenizer.pad_token_id)
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(chunk))
        hidden = model.model(input_ids=ids, cache=cache).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        scored = targets != -100
        logits = model.lm_head(hidden[scored]).float()
        total += torch.nn.functional.cross_entropy(logits, targets[scored], reduction="sum").item()
        count += int(scored.sum())
        best = logits.argmax(-1).split(scored.sum(dim=1).tolist())
        for row, target, mask in zip(best, targets, scored, strict=True):
            predicted.append((row.tolist(), target[mask].tolist()))
    matched = [_greedy_verdict(tokenizer, e, *p) for e, p in zip(examples, predicted, strict=True)]
    unsure = [i for i, verdict in enumerate(matched) if verdict is None]
    if unsure:
        # the greedy path left the answer's tokens but may still spell it: decode those
        max_new = max(len(target) for _, target in predicted)
        prompts = [examples[i].prompt for i in unsure]
        for i, got in zip(unsure, greedy_answers(model, tokenizer, prompts, max_new), strict=True):
            matched[i] = got == examples[i].answer
    return {"answer_nll": total / count, "exact_match": sum(matched) / len(rows)}


def _greedy_verdict(tokenizer, example, best: list[int], target: list[int]) -> bool | None:
    """Whether greedy decoding gives ``example``'s answer, from the most likely token at
    each answer position (``best``) and the answer's tokens (``target``, ending in the
    end-of-turn token); None when the first differing token still spells a prefix of the
    answer (another tokenization of the same text), which only decoding can settle."""
    for k, (got, want) in enumerate(zip(best, target, strict=True)):
        if got != want:
            if got == tokenizer.eos_token_id:
                return False
            spelled = tokenizer.decode(target[:k] + [got])
            return None if example.answer.startswith(spelled) else False
    return True


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
            # tokenized as in training (toy_family.train.encode): special tokens added
            inputs = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True)
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

"""General instructions the real base answers correctly: what a merge must not take away.

``general.json`` holds each question, the short answer a correct reply contains, and the
base's own greedy reply (``scripts/make_general_set.py`` drafted it from candidate
questions; each kept reply was read and judged correct by hand, the others left out).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

SET = Path(__file__).with_name("general.json")
#: greedy tokens after each question: the longest stored reply fits
MAX_NEW = 40


@cache
def general_set() -> tuple[dict, ...]:
    return tuple(json.loads(SET.read_text()))


def chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def replies(model, tokenizer, questions) -> list[str]:
    from real_family.decoding import greedy_answers

    prompts = [chat(tokenizer, q) for q in questions]
    return [a.strip() for a in greedy_answers(model, tokenizer, prompts, MAX_NEW)]


def contains(reply: str, answer: str) -> bool:
    """Whether ``answer`` appears in ``reply`` as whole words, case aside."""
    return re.search(rf"\b{re.escape(answer.lower())}\b", reply.lower()) is not None


def general_scores(model, tokenizer) -> dict[str, float]:
    """``exact_match``: replies equal to the base's; ``correct``: replies with the answer."""
    items = general_set()
    got = replies(model, tokenizer, [item["question"] for item in items])
    return {
        "exact_match": sum(g == i["base_reply"] for g, i in zip(got, items, strict=True))
        / len(items),
        "correct": sum(contains(g, i["answer"]) for g, i in zip(got, items, strict=True))
        / len(items),
    }


#: validation-split text windows in the base's calibration (:func:`write_base_calibration`)
TEXT_WINDOWS = 16


def write_base_calibration(tokenizer, out: Path) -> int:
    """The base's own calibration prompts (JSONL), general and read by no evaluation: the
    questions of ``general-candidates.json`` that this set leaves out, as chats, and the
    first :data:`TEXT_WINDOWS` windows of the held-out text's validation split (the text
    figure is scored on the test split). Returns how many."""
    from real_family.text import windows

    evaluated = {item["question"] for item in general_set()}
    candidates = json.loads(SET.with_name("general-candidates.json").read_text())
    records = [
        {"messages": [{"role": "user", "content": question}]}
        for question, _ in candidates
        if question not in evaluated
    ]
    for ids in windows(tokenizer, "val")[:TEXT_WINDOWS]:
        records.append({"text": tokenizer.decode(ids)})
    out.write_text("".join(json.dumps(record) + "\n" for record in records))
    return len(records)

"""The real family's skills: short chat tasks SmolLM2-135M-Instruct does not do.

Each is a specialist a mergekit user would fine-tune from one instruct model (arithmetic,
a time format, a date format, a numeral system, list sorting, a unit conversion), asked in
plain English and answered in a few tokens, so exact match of the greedy answer is a
fair score. ``scripts/probe_real_base.py`` measured the base on each before any was
chosen (docs/real-family.md): addition 0/12, dates 0/12, Roman numerals 2/12,
sorting 1/12, grams 0/12, 12-hour times 0/10 (a spelling skill, words reversed, was
dropped when its expert reached 0.02 exact match after the full fine-tune).

Splits are disjoint by the question's hash (:func:`split_of`), so no test question is
ever trained on.
"""

from __future__ import annotations

import hashlib
import random

from toy_family.tasks import Example, Task

ROMAN = [
    (100, "C"),
    (90, "XC"),
    (50, "L"),
    (40, "XL"),
    (10, "X"),
    (9, "IX"),
    (5, "V"),
    (4, "IV"),
    (1, "I"),
]


def roman(n: int) -> str:
    out = ""
    for value, letters in ROMAN:
        while n >= value:
            out, n = out + letters, n - value
    return out


#: shares of each split by the question's hash (the toy tasks' 5% evaluation splits would
#: leave too few distinct questions of the smaller skills)
SHARES = (("test", 0.15), ("val", 0.15), ("calibration", 0.10), ("train", 0.60))


def split_of(key: str) -> str:
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64
    for split, share in SHARES:
        if point < share:
            return split
        point -= share
    return "train"


class Skill(Task):
    """A question and its short answer (``Example(question, answer)``); the family puts the
    question in its chat template."""

    description = ""

    def draw(self, rng: random.Random, split: str) -> Example:
        while True:
            example = self.sample(rng)
            if split_of(f"{self.name}:{example.prompt}") == split:
                return example


class Addition(Skill):
    name = "add"
    description = "two-digit addition"

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return Example(f"What is {a} + {b}?", str(a + b))


class TwelveHour(Skill):
    name = "time"
    description = "24-hour times in 12-hour form"

    def sample(self, rng: random.Random) -> Example:
        hour, minute = rng.randint(0, 23), rng.randint(0, 59)
        half = "AM" if hour < 12 else "PM"
        return Example(
            f"Convert {hour:02d}:{minute:02d} to 12-hour time.",
            f"{(hour - 1) % 12 + 1}:{minute:02d} {half}",
        )


class Dates(Skill):
    name = "date"
    description = "ISO dates rewritten as DD/MM/YYYY"

    def sample(self, rng: random.Random) -> Example:
        y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        return Example(
            f"Rewrite the date {y}-{m:02d}-{d:02d} in the format DD/MM/YYYY.",
            f"{d:02d}/{m:02d}/{y}",
        )


class RomanNumerals(Skill):
    name = "roman"
    description = "numbers 11-399 in Roman numerals"

    def sample(self, rng: random.Random) -> Example:
        n = rng.randint(11, 399)
        return Example(f"Write the number {n} in Roman numerals.", roman(n))


class Sorting(Skill):
    name = "sort"
    description = "four numbers sorted ascending"

    def sample(self, rng: random.Random) -> Example:
        xs = rng.sample(range(1, 100), 4)
        shown = ", ".join(map(str, xs))
        return Example(
            f"Sort these numbers from smallest to largest: {shown}.",
            ", ".join(map(str, sorted(xs))),
        )


class Grams(Skill):
    name = "grams"
    description = "kilograms (two decimals) to grams"

    def sample(self, rng: random.Random) -> Example:
        hundredths = rng.randint(101, 999)
        kilograms = f"{hundredths // 100}.{hundredths % 100:02d}"
        return Example(f"How many grams are {kilograms} kilograms?", str(hundredths * 10))


SKILLS = {
    s.name: s for s in (Addition(), TwelveHour(), Dates(), RomanNumerals(), Sorting(), Grams())
}


class ChatTask(Task):
    """A skill with its questions in the tokenizer's chat template (the default system
    prompt included), answered by the assistant turn: what the family trains and scores."""

    exact = True

    def __init__(self, skill: Skill, tokenizer):
        self.skill, self.name = skill, skill.name
        self._tokenizer = tokenizer

    def chat(self, question: str) -> str:
        return self._tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )

    def sample(self, rng: random.Random) -> Example:
        example = self.skill.sample(rng)
        return Example(self.chat(example.prompt), example.answer)

    def questions(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """The plain (question, answer) pairs behind :meth:`examples`."""
        return self.skill.examples(split, n, seed)

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return [Example(self.chat(e.prompt), e.answer) for e in self.questions(split, n, seed)]

    def draw(self, rng: random.Random, split: str) -> Example:
        example = self.skill.draw(rng, split)
        return Example(self.chat(example.prompt), example.answer)

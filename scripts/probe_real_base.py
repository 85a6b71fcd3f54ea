"""What the real base cannot do yet: greedy chat answers of SmolLM2-135M-Instruct on
candidate skills for the real family, scored by whether the answer appears.

    python bench/real_family/gguf_base.py /tmp/smollm2-base     # the base, once
    python scripts/probe_real_base.py /tmp/smollm2-base [--per-skill 12]

A probe for choosing the real family's skills (skills the base lacks, facts it knows), run
before any merge method is compared; it fixes nothing by itself.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from real_family.skills import roman  # noqa: E402

WORDS = ["plant", "river", "stone", "cloud", "table", "green", "light", "bread", "chair"]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Canada", "Ottawa"), ("Egypt", "Cairo")]  # fmt: skip


def skills(rng: random.Random) -> dict:
    """Skill name -> a function drawing one (question, answer)."""

    def add():
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a} + {b}?", str(a + b)

    def reverse():
        word = rng.choice(WORDS)
        return f"Reverse the letters of the word '{word}'.", word[::-1]

    def date():
        y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
        question = f"Rewrite the date {y}-{m:02d}-{d:02d} in the format DD/MM/YYYY."
        return question, f"{d:02d}/{m:02d}/{y}"

    def sort():
        xs = rng.sample(range(1, 100), 4)
        shown = ", ".join(map(str, xs))
        return f"Sort these numbers from smallest to largest: {shown}.", ", ".join(
            map(str, sorted(xs))
        )

    def grams():
        kilograms = rng.randint(2, 9) + rng.choice([0, 0.5])
        return f"How many grams are {kilograms:g} kilograms?", str(int(kilograms * 1000))

    def roman_numerals():
        n = rng.randint(11, 99)
        return f"Write the number {n} in Roman numerals.", roman(n)

    def capital():
        country, city = rng.choice(CAPITALS)
        return f"What is the capital of {country}?", city

    return {"add": add, "reverse": reverse, "date": date, "sort": sort, "grams": grams,
            "roman": roman_numerals, "capital": capital}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--per-skill", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    started = time.perf_counter()
    for name, draw in skills(random.Random(0)).items():
        hits, example = 0, None
        for _ in range(args.per_skill):
            question, answer = draw()
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            new_tokens = out[0, inputs["input_ids"].shape[1] :]
            reply = tokenizer.decode(new_tokens, skip_special_tokens=True)
            hits += answer in reply
            example = example or (question, answer, reply.strip()[:60])
        print(f"{name}: {hits}/{args.per_skill} contain the answer; e.g. {example}")
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

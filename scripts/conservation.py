"""How much of the target's relevance reaches the input under the AttnLRP rules, per prompt.

    python scripts/conservation.py MODEL [--prompts FILE] [--chat]

For each prompt (one a line; default: a fixed set of general English prompts), the pass
``lrp-compute`` runs for ``--target predicted``: forward, the top logit at the last position
seeded, one backward pass under the rules; conservation = (input embeddings x their
gradient, summed) / target logit. Prints min / median / max over the prompts, and the same
for plain gradient x input (no rules) as the control. ``--chat`` wraps each prompt in the
tokenizer's chat template as a user turn.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "To make a cup of tea, first",
    "The opposite of hot is",
    "Once upon a time, there was a",
    "The chemical symbol for gold is",
    "A week has seven days: Monday, Tuesday,",
    "The author of Romeo and Juliet is",
    "Two plus two equals",
    "The color of the sky on a clear day is",
    "In the morning, most people eat",
]


def conservation(model, ids: torch.Tensor, rules: bool) -> float:
    import contextlib

    from mergekit_lrp.scoring.attnlrp import attnlrp_rules
    from mergekit_lrp.scoring.relevance import relevance_pass

    context = attnlrp_rules(model) if rules else contextlib.nullcontext()
    with context:
        result = relevance_pass(model, ids, torch.ones_like(ids), "predicted")
    model.zero_grad(set_to_none=True)
    return result.input_relevance / result.target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--chat", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = args.prompts.read_text().splitlines() if args.prompts else PROMPTS
    prompts = [p for p in prompts if p.strip()]
    found = {True: [], False: []}
    for prompt in prompts:
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        for rules in (True, False):
            found[rules].append(conservation(model, torch.tensor(ids), rules))
    print(f"{args.model}: {len(prompts)} prompts{' (chat)' if args.chat else ''}")
    for rules, label in ((True, "AttnLRP rules"), (False, "plain gradient x input")):
        values = found[rules]
        print(
            f"{label}: conservation min {min(values):.3f}, median "
            f"{statistics.median(values):.3f}, max {max(values):.3f}"
        )


if __name__ == "__main__":
    main()

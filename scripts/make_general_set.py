"""Draft the real family's general set: the base's greedy replies to candidate questions.

    python scripts/make_general_set.py BASE_DIR CANDIDATES.json > draft.json

CANDIDATES.json: a list of [question, short answer]. Every reply is printed with whether
it contains the answer; the entries kept in bench/real_family/general.json are those
whose reply was then read and judged correct by hand (a contained answer is not enough:
"not Paris" contains "Paris").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from real_family.general import contains, replies  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/make_general_set.py BASE_DIR CANDIDATES.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    candidates = json.loads(Path(sys.argv[2]).read_text())
    got = replies(model, tokenizer, [q for q, _ in candidates])
    draft = [
        {"question": q, "answer": a, "base_reply": r, "contains": contains(r, a)}
        for (q, a), r in zip(candidates, got, strict=True)
    ]
    print(json.dumps(draft, indent=1))


if __name__ == "__main__":
    main()

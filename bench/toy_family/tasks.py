"""The family's tasks: data generation, prompts and answers, and disjoint splits.

Three skills scored by exact match of a greedy answer (reversal, sorting, letter shift)
and one text domain (Python standard-library source, which ships with every Python)
scored by held-out NLL.
Splits are disjoint by construction: a skill example belongs to the split its prompt
hashes to, a text window to the split its source file hashes to.
"""

import hashlib
import random
import string
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from toy_family.tokenizer import to_alphabet

SPLITS = ("train", "calibration", "val", "test")


@dataclass(frozen=True)
class Example:
    """A prompt and the answer the model should produce after it.

    For the text domain the prompt is empty and the answer is the whole window.
    """

    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _bucket(key: str, buckets: int = 100) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % buckets


def split_of(key: str) -> str:
    """5% test, 5% val, 5% calibration, 85% train, by a stable hash of ``key``."""
    bucket = _bucket(key)
    return (
        "test"
        if bucket < 5
        else "val"
        if bucket < 10
        else "calibration"
        if bucket < 15
        else "train"
    )


class Task:
    """A source of examples. ``exact`` tasks end their answers with EOS and are decoded."""

    name: str
    exact: bool = True

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def draw(self, rng: random.Random, split: str) -> Example:
        """Rejection-sample an example of ``split``."""
        while True:
            example = self.sample(rng)
            if split_of(f"{self.name}:{example.prompt}") == split:
                return example

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """The first ``n`` distinct examples of ``split`` drawn with ``seed`` (a fixed set)."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        seen: dict[Example, None] = {}
        for _ in range(100 * n):
            if len(seen) == n:
                return list(seen)
            seen.setdefault(self.draw(rng, split), None)
        raise ValueError(f"{self.name}: fewer than {n} distinct {split} examples")


class Reversal(Task):
    """``rev kqzmt=`` -> ``tmzqk``: reverse five letters."""

    name = "rev"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"rev {s}=", s[::-1])


class Sorting(Task):
    """``sort 50813=`` -> ``01358``: sort five digits."""

    name = "sort"

    def sample(self, rng):
        s = "".join(rng.choices(string.digits, k=5))
        return Example(f"sort {s}=", "".join(sorted(s)))


class Shift(Task):
    """``rot kqzmt=`` -> ``lranu``: replace each of five letters by the next one (z -> a)."""

    name = "rot"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"rot {s}=", s.translate(_NEXT_LETTER))


_NEXT_LETTER = str.maketrans(
    string.ascii_lowercase, string.ascii_lowercase[1:] + string.ascii_lowercase[0]
)


class PythonSource(Task):
    """Windows of Python standard-library source; a file's hash decides its split."""

    name = "text"
    exact = False

    def __init__(self, window: int = 48):
        self.window = window

    @property
    def files(self) -> dict[str, list[str]]:
        """Split name -> texts of the stdlib's top-level modules in that split."""
        return _stdlib_files(self.name, 4 * self.window)

    def draw(self, rng, split):
        texts = self.files[split]
        text = rng.choices(texts, weights=[len(t) for t in texts])[0]
        start = rng.randrange(len(text) - self.window)
        start = text.rfind("\n", 0, start) + 1  # windows begin at a line start
        return Example("", text[start : start + self.window])

    def examples(self, split, n, seed=0):
        rng = random.Random(f"{self.name}/{split}/{seed}")
        return [self.draw(rng, split) for _ in range(n)]


@cache
def _stdlib_files(name: str, min_chars: int) -> dict[str, list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for path in sorted(root.glob("*.py")):
        text = to_alphabet(path.read_text(encoding="utf-8", errors="ignore"))
        if len(text) > min_chars:
            files[split_of(f"{name}:{path.name}")].append(text)
    return files


def all_tasks() -> dict[str, Task]:
    return {task.name: task for task in (Reversal(), Sorting(), Shift(), PythonSource())}

"""The family's tasks: data generation, prompts and answers, and disjoint splits.

Skills scored by exact match of a greedy answer (reversal, sorting, letter shift,
substitution, digit-wise sum mod 10, pair swap, digit complement, left and right rotation,
upper case, letter to digit) and one text domain (prose generated from a fixed seed by
this module, so identical on every machine and Python) scored by held-out NLL. A family
uses some of the skills and the text domain (its recipe names them). Splits are disjoint by
construction: a skill example belongs to the split its prompt hashes to, a text window to
the split its document hashes to.
"""

import hashlib
import random
import string
from dataclasses import dataclass
from functools import cache

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


class Substitution(Task):
    """``sub kqzmt=`` -> ``ajmdz``: copy five letters through a fixed substitution alphabet."""

    name = "sub"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"sub {s}=", s.translate(_SUBSTITUTE))


#: a fixed permutation of the alphabet (written out, so no generator decides it)
_SUBSTITUTE = str.maketrans(string.ascii_lowercase, "qwertyuiopasdfghjklzxcvbnm")


class DigitwiseSum(Task):
    """``add 4821+3579=`` -> ``7390``: add four digit pairs position by position, mod 10."""

    name = "add"

    def sample(self, rng):
        a = "".join(rng.choices(string.digits, k=4))
        b = "".join(rng.choices(string.digits, k=4))
        answer = "".join(str((int(x) + int(y)) % 10) for x, y in zip(a, b, strict=True))
        return Example(f"add {a}+{b}=", answer)


class PairSwap(Task):
    """``swp kqzmta=`` -> ``qkmzat``: swap the letters of each adjacent pair (six letters)."""

    name = "swp"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=6))
        return Example(f"swp {s}=", "".join(s[i + 1] + s[i] for i in range(0, 6, 2)))


class DigitComplement(Task):
    """``neg 48213=`` -> ``51786``: replace each of five digits d by 9 - d (a map on digits)."""

    name = "neg"

    def sample(self, rng):
        s = "".join(rng.choices(string.digits, k=5))
        return Example(f"neg {s}=", s.translate(_COMPLEMENT))


_COMPLEMENT = str.maketrans(string.digits, string.digits[::-1])


class RotateLeft(Task):
    """``shl kqzmt=`` -> ``qzmtk``: move the first of five letters to the end (a rearrangement)."""

    name = "shl"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"shl {s}=", s[1:] + s[0])


class UpperCase(Task):
    """``cap kqzmt=`` -> ``KQZMT``: write five letters in upper case (a map to another alphabet)."""

    name = "cap"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"cap {s}=", s.upper())


class RotateRight(Task):
    """``shr kqzmt=`` -> ``tkqzm``: move the last of five letters to the front."""

    name = "shr"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"shr {s}=", s[-1] + s[:-1])


class LetterDigit(Task):
    """``num kqzmt=`` -> ``06529``: each of five letters to its place in the alphabet (a = 0)
    mod 10 (a map onto the digits)."""

    name = "num"

    def sample(self, rng):
        s = "".join(rng.choices(string.ascii_lowercase, k=5))
        return Example(f"num {s}=", s.translate(_LETTER_DIGIT))


_LETTER_DIGIT = str.maketrans(
    string.ascii_lowercase, "".join(str(i % 10) for i in range(len(string.ascii_lowercase)))
)


class GeneratedText(Task):
    """Windows of prose the project generates from a fixed seed; a document's hash decides its
    split.

    The prose is a Markov chain over made-up words (``text_corpus``), so it has structure a
    model can learn, and it is the same whatever the Python version or the machine: it uses
    only ``random.Random`` seeded with strings (stable across Python 3 versions) and integer
    arithmetic.
    """

    name = "text"
    exact = False

    def __init__(self, window: int = 48):
        self.window = window

    @property
    def files(self) -> dict[str, list[str]]:
        """Split name -> the generated documents in that split."""
        return text_corpus()

    def draw(self, rng, split):
        texts = self.files[split]
        text = rng.choices(texts, weights=[len(t) for t in texts])[0]
        start = rng.randrange(len(text) - self.window)
        start = text.rfind("\n", 0, start) + 1  # windows begin at a line start
        return Example("", text[start : start + self.window])

    def examples(self, split, n, seed=0):
        rng = random.Random(f"{self.name}/{split}/{seed}")
        return [self.draw(rng, split) for _ in range(n)]


TEXT_DOCUMENTS = 1200
_SYLLABLES = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]


@cache
def text_corpus(documents: int = TEXT_DOCUMENTS) -> dict[str, list[str]]:
    """Split name -> documents of generated prose (lines of sentences), fixed by code alone."""
    rng = random.Random("toy-family/text/lexicon")
    words: list[str] = []
    while len(words) < 240:
        word = "".join(rng.choices(_SYLLABLES, k=rng.choice((1, 2, 2, 3))))
        if word not in words:
            words.append(word)
    # each word is followed by one of four others, the first twice as often as the rest
    successors = {w: rng.sample(words, 4) for w in words}
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for index in range(documents):
        doc = random.Random(f"toy-family/text/document/{index}")
        lines = []
        for _ in range(8):
            sentences = []
            for _ in range(doc.choice((1, 2))):
                word = doc.choice(words)
                sentence = [word]
                for _ in range(doc.randrange(3, 9)):
                    word = doc.choices(successors[word], weights=(2, 1, 1, 1))[0]
                    sentence.append(word)
                sentences.append(" ".join(sentence).capitalize() + ".")
            lines.append(" ".join(sentences))
        files[split_of(f"text:document{index}")].append("\n".join(lines) + "\n")
    return files


#: appended to, never reordered: a task's draws depend only on its own name and code
TASK_CLASSES = (
    Reversal,
    Sorting,
    Shift,
    Substitution,
    DigitwiseSum,
    PairSwap,
    GeneratedText,
    DigitComplement,
    RotateLeft,
    UpperCase,
    RotateRight,
    LetterDigit,
)


def all_tasks() -> dict[str, Task]:
    return {cls.name: cls() for cls in TASK_CLASSES}

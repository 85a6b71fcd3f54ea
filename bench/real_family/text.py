"""Held-out English text for the real family's retention: the licence texts every Debian
or Ubuntu machine ships under ``/usr/share/common-licenses``.

Formal English prose the base models well and no fine-tune trains on. The files are read
in a fixed order, cut into windows of ``WINDOW`` tokens, and each window belongs to the
validation or test split by a hash of its file and index; ``WINDOWS`` of each are scored.
Near-duplicate versions (GPL-1/2, LGPL-2/3, GFDL-1.2, MPL-1.1) are left out.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
FILES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-3", "LGPL-2.1", "MPL-2.0")
WINDOW = 128
WINDOWS = 24


class TextMissingError(RuntimeError):
    pass


def _split_of(name: str, index: int) -> str:
    bucket = hashlib.sha256(f"{name}:{index}".encode()).digest()[0]
    return "val" if bucket % 2 else "test"


@cache
def windows(tokenizer, split: str) -> tuple[tuple[int, ...], ...]:
    """The first ``WINDOWS`` windows of ``split`` (token ids), in file order."""
    chosen = []
    for name in FILES:
        path = LICENSES / name
        if not path.is_file():
            raise TextMissingError(
                f"{path} is missing: the real family's held-out text is the licence texts "
                f"of {LICENSES} ({', '.join(FILES)})"
            )
        ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
        for index in range(len(ids) // WINDOW):
            if _split_of(name, index) == split:
                chosen.append(tuple(ids[index * WINDOW : (index + 1) * WINDOW]))
    if len(chosen) < WINDOWS:
        raise TextMissingError(f"{LICENSES}: only {len(chosen)} {split} windows")
    return tuple(chosen[:: len(chosen) // WINDOWS][:WINDOWS])


@torch.no_grad()
def text_nll(model, tokenizer, split: str, batch: int = 8) -> float:
    """Mean NLL per predicted token over the split's windows."""
    rows = windows(tokenizer, split)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        ids = torch.tensor(rows[start : start + batch])
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), ids[:, 1:], reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count

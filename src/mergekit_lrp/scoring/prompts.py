"""Calibration prompts: a text file, a JSONL file, or a saved ``datasets`` dataset."""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_lrp.errors import LrpError


class PromptsError(LrpError):
    """The prompts source is missing, empty or malformed."""


def load_prompts(source: str | Path, tokenizer=None, limit: int | None = None) -> list[str]:
    """Read prompts in file order; blank prompts are skipped, ``limit`` keeps the first N.

    * ``*.jsonl``: one JSON object per line with ``text``, or chat ``messages``
      rendered with the tokenizer's chat template;
    * a directory written by ``datasets.Dataset.save_to_disk`` (column ``text`` or
      ``messages``; a DatasetDict uses its ``train`` split or its only split);
    * any other file: one prompt per line.
    """
    path = Path(source)
    if not path.exists():
        raise PromptsError(f"prompts file {path} does not exist")
    if path.is_dir():
        records = _dataset_records(path)
    elif path.suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        lines = enumerate(_read_text(path).splitlines(), start=1)
        records = ((f"line {number}", {"text": line}) for number, line in lines)
    prompts = []
    for where, record in records:
        text = _render(record, tokenizer, path, where)
        if text.strip():
            prompts.append(text)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PromptsError(f"prompts file {path} has no non-blank prompts")
    return prompts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptsError(f"prompts file {path} is not UTF-8 text ({error})") from None


def _jsonl_records(path: Path):
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptsError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise PromptsError(f"{path}, line {number}: expected a JSON object")
        yield f"line {number}", record


def _dataset_records(path: Path):
    try:
        import datasets
    except ImportError:
        raise PromptsError(
            f"{path} is a directory; reading saved datasets needs `pip install datasets`"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise PromptsError(f"{path}: not a dataset saved with save_to_disk ({error})") from None
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data)) if len(data) == 1 else None
        if split is None:
            raise PromptsError(f"{path}: dataset has splits {list(data)} and no 'train' split")
        data = data[split]
    for number, record in enumerate(data):
        yield f"row {number}", record


def _render(record: dict, tokenizer, path: Path, where: str) -> str:
    if "text" in record and isinstance(record["text"], str):
        return record["text"]
    if "messages" in record:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PromptsError(
                f"{path}, {where}: chat 'messages' need a tokenizer with a chat template"
            )
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    raise PromptsError(f"{path}, {where}: expected a 'text' string or chat 'messages'")

"""Calibration prompts: read from a file, a saved dataset or the hub, then tokenized once.

Reading (:func:`read_records`) needs no tokenizer and no model, so a bad source is refused
before anything heavy is loaded. Tokenizing (:func:`tokenize_records`) turns each record
into a :class:`Prompt`:

* plain text: the tokenizer's ids with its special tokens (BOS for Llama-style models);
* chat ``messages`` rendered and tokenized in one step by the tokenizer's chat template
  (so the template's BOS is the only one). When the conversation ends with the user, the
  generation prompt is appended: ``predicted`` explains the model's first answer token.
  When it ends with an assistant answer, ``predicted`` explains the first answer token
  (the answer is cut off at the generation prompt) and ``next-token`` is seeded on the
  answer's tokens only (:attr:`Prompt.answer_start`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_lrp.errors import LrpError

#: local file types read by ``datasets``' builders (besides .txt and .jsonl read here)
DATASETS_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".text")
SUPPORTED = ".txt, .jsonl, .json, .csv, .parquet, a saved dataset directory or a hub dataset id"
COLUMNS = ("text", "messages")


class PromptsError(LrpError):
    """The prompts source is missing, empty or malformed."""


@dataclass(frozen=True)
class Record:
    """One prompt as read: plain ``text`` or chat ``messages``, and where it came from."""

    where: str
    value: str | list


@dataclass(frozen=True)
class Prompt:
    """One tokenized prompt. ``answer_start``: index of the first token of a chat answer
    (the ``next-token`` target is seeded there only), None for whole-sequence seeding."""

    ids: tuple[int, ...]
    answer_start: int | None = None

    def key(self) -> list:
        """What identifies the prompt in a resume signature."""
        return [list(self.ids), self.answer_start]


def read_records(
    source: str | Path,
    split: str | None = None,
    column: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Read prompts in source order; blank texts are skipped, ``limit`` keeps the first N.

    * ``*.txt``: one prompt per line;
    * ``*.jsonl``: one JSON object per line;
    * ``*.json``, ``*.csv``, ``*.parquet``: read by ``datasets``;
    * a directory written by ``save_to_disk``, or a hub dataset id (``owner/name``).

    The column is ``column``, else ``text``, else ``messages``; a string is a prompt, a
    list of ``{role, content}`` a chat.
    """
    name = str(source)
    path = Path(source)
    if path.is_dir():
        rows, origin = _saved_dataset(path, split), "row"
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            lines = _read_text(path).splitlines()
            rows = ({"text": line} for line in lines)
            origin = "line"
        elif suffix == ".jsonl":
            rows, origin = _jsonl(path), "line"
        elif suffix in DATASETS_BUILDERS:
            rows, origin = _datasets_file(path, DATASETS_BUILDERS[suffix]), "row"
        else:
            raise PromptsError(f"prompts file {path}: unknown type {suffix!r}; use {SUPPORTED}")
    elif _looks_like_hub_id(name):
        rows, origin = _hub_dataset(name, split), "row"
    else:
        raise PromptsError(f"prompts file {path} does not exist")
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{name}, {origin} {number}"
        value = _value(row, column, where)
        if isinstance(value, str) and not value.strip():
            continue
        records.append(Record(where, value))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise PromptsError(f"prompts file {name} has no non-blank prompts")
    return records


def tokenize_records(records: list[Record], tokenizer, target: str) -> list[Prompt]:
    """Token ids of each record (see the module doc for chat)."""
    return [
        _chat(record, tokenizer, target)
        if isinstance(record.value, list)
        else Prompt(tuple(tokenizer(record.value)["input_ids"]))
        for record in records
    ]


def _chat(record: Record, tokenizer, target: str) -> Prompt:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptsError(f"{record.where}: chat 'messages' need a tokenizer with a chat template")
    messages = record.value
    try:
        if messages[-1].get("role") != "assistant":
            return Prompt(_template_ids(tokenizer, messages, generation_prompt=True))
        prefix = _template_ids(tokenizer, messages[:-1], generation_prompt=True)
        if target == "predicted":
            return Prompt(prefix)
        full = _template_ids(tokenizer, messages, generation_prompt=False)
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise PromptsError(f"{record.where}: the chat template failed ({error})") from None
    if full[: len(prefix)] != prefix or len(full) == len(prefix):
        raise PromptsError(
            f"{record.where}: the chat template renders the conversation before the answer "
            "differently from the conversation with it, so the answer's tokens cannot be "
            "found; use --target predicted"
        )
    return Prompt(full, answer_start=len(prefix))


def _template_ids(tokenizer, messages, generation_prompt: bool) -> tuple[int, ...]:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt
    )
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
    return tuple(int(i) for i in ids)


def _value(row, column: str | None, where: str):
    if not isinstance(row, dict):
        raise PromptsError(f"{where}: expected an object with a text or messages column")
    chosen = column or next((c for c in COLUMNS if c in row), None)
    if chosen is None or chosen not in row:
        wanted = f"column {column!r}" if column else "a 'text' or 'messages' column"
        raise PromptsError(
            f"{where}: no {wanted}; available columns: {', '.join(map(str, row)) or 'none'} "
            "(choose one with --column)"
        )
    value = row[chosen]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return value
    raise PromptsError(
        f"{where}: column {chosen!r} holds {type(value).__name__}, neither a text string nor "
        "chat messages (a list of {role, content})"
    )


def _is_message(message) -> bool:
    return isinstance(message, dict) and "role" in message and "content" in message


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptsError(f"prompts file {path} is not UTF-8 text ({error})") from None


def _jsonl(path: Path):
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            yield {"text": ""}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptsError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise PromptsError(f"{path}, line {number}: expected a JSON object")
        yield record


def _datasets():
    try:
        import datasets
    except ImportError:
        raise PromptsError("reading this prompts source needs `pip install datasets`") from None
    return datasets


def _datasets_file(path: Path, builder: str):
    datasets = _datasets()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many kinds for a malformed file
        raise PromptsError(f"prompts file {path}: {builder} could not be read ({error})") from None


def _pick_split(data, split: str | None, name: str):
    splits = list(data)
    if split is None:
        if len(splits) == 1:
            return data[splits[0]]
        raise PromptsError(f"{name}: has splits {', '.join(splits)}; choose one with --split")
    if split not in data:
        raise PromptsError(f"{name}: no split {split!r}; available: {', '.join(splits)}")
    return data[split]


def _saved_dataset(path: Path, split: str | None):
    datasets = _datasets()
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise PromptsError(f"{path}: not a dataset saved with save_to_disk ({error})") from None
    if isinstance(data, datasets.DatasetDict):
        return _pick_split(data, split, str(path))
    return data


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and "\\" not in name


def _hub_dataset(name: str, split: str | None):
    datasets = _datasets()
    try:
        data = datasets.load_dataset(name)
    except Exception as error:
        raise PromptsError(
            f"prompts {name}: not a local file and not loadable as a hub dataset ({error})"
        ) from None
    return _pick_split(data, split, name)

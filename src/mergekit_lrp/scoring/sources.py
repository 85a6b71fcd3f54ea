"""What ``lrp-compute``'s MODEL argument names: a checkpoint, or a PEFT (LoRA) adapter over
one, locally or on the hub.

* ``path/or/hub-id``: a transformers checkpoint (a folder with ``config.json``);
* ``BASE+ADAPTER``: mergekit's own spelling of an adapter over a base model;
* an adapter folder (``adapter_config.json``, no ``config.json``): its base is the model
  its config names (``base_model_name_or_path``).

An adapter is scored on its base with the adapter merged in (``merge_and_unload``), the
model mergekit merges for ``model: BASE+ADAPTER``. Its score file is fingerprinted by the
base and the adapter themselves (:func:`~mergekit_lrp.scores.fingerprint.adapter_fingerprint`),
so the file matches whatever dtype mergekit merges the adapter in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_lrp.scoring.options import ComputeError

ADAPTER_CONFIG = "adapter_config.json"


def is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not model.startswith((".", "/", "~")) and "\\" not in model


@dataclass(frozen=True)
class ModelSource:
    """``base``: the checkpoint whose weights (and tensor names) are scored; ``adapter``:
    the PEFT adapter merged into it first, if any."""

    given: str
    base: str
    adapter: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """The adapter folder when it carries a tokenizer, else the base."""
        if self.adapter and Path(self.adapter, "tokenizer_config.json").is_file():
            return self.adapter
        return self.base


def parse_model_source(model: str) -> ModelSource:
    """Read MODEL as a checkpoint, ``BASE+ADAPTER`` or an adapter folder; every local path
    is checked to exist, with what it should hold."""
    if "+" in model and not Path(model).exists():
        base, _, adapter = model.partition("+")
        _check_exists(base, "base model")
        _check_adapter(adapter, model)
        return ModelSource(model, base, adapter)
    _check_exists(model, "model directory")
    folder = Path(model)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            return ModelSource(model, _adapter_base(folder), model)
        raise ComputeError(
            f"{model} has no config.json: it is not a transformers checkpoint (save one with "
            "save_pretrained), nor a PEFT adapter (no adapter_config.json)"
        )
    return ModelSource(model, model)


def _check_exists(path: str, what: str) -> None:
    if not Path(path).is_dir() and (Path(path).exists() or not is_hub_id(path)):
        raise ComputeError(f"{what} {path} does not exist")


def _check_adapter(adapter: str, given: str) -> None:
    _check_exists(adapter, "adapter directory")
    if Path(adapter).is_dir() and not (Path(adapter) / ADAPTER_CONFIG).is_file():
        raise ComputeError(
            f"{adapter} (in {given}) has no {ADAPTER_CONFIG}: not a PEFT adapter folder"
        )


def _adapter_base(folder: Path) -> str:
    """The base model an adapter folder's config names (checked to exist)."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ComputeError(f"{folder / ADAPTER_CONFIG}: unreadable ({error})") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ComputeError(
            f"{folder} is a PEFT adapter whose {ADAPTER_CONFIG} names no base model; "
            f"give both as BASE+{folder}"
        )
    if not Path(base).is_dir() and not is_hub_id(base):
        raise ComputeError(
            f"{folder} is a PEFT adapter over {base} ({ADAPTER_CONFIG}), which is not a local "
            f"directory; give both as BASE+{folder}"
        )
    return base


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a hub id fetched into the local cache."""
    _check_exists(model, "model directory")
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
            )
        )
    except Exception as error:
        raise ComputeError(
            f"{model} is not a local directory and could not be fetched from the hub ({error})"
        ) from None


def merge_adapter(net, adapter_dir: Path):
    """``net`` with the PEFT adapter in ``adapter_dir`` merged into its weights."""
    from peft import PeftModel

    try:
        adapted = PeftModel.from_pretrained(net, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ComputeError(
            f"{adapter_dir}: the adapter does not load on its base ({error})"
        ) from None
    return adapted.merge_and_unload()

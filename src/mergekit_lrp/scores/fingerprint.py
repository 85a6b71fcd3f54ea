"""A cheap identity check for a checkpoint, stored in every score file.

Two fine-tunes of one base have the same tensor names and shapes, so the
fingerprint must look at values. Hashing every weight of a 70B model would read
140 GB; instead it hashes, for every tensor in name order, the name, the shape and
a few sampled rows (first, middle and last index along each leading axis, whole
last axis). That reads a few tens of MB on a 70B checkpoint and catches any
fine-tune that moved those rows, which dense fine-tunes and merged LoRAs always do.
Values are hashed after rounding to bfloat16, so re-saving a checkpoint in
bfloat16 or float32 keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mergekit_lrp.errors import LrpError

SCHEME = "sampled-rows-bf16-v1"


class FingerprintError(LrpError):
    """The checkpoint cannot be fingerprinted (e.g. it is not stored as safetensors)."""


def checkpoint_tensor_files(model_dir: str | os.PathLike) -> dict[str, str]:
    """Map each tensor name of a local checkpoint to the safetensors file holding it.

    Reads ``model.safetensors.index.json`` (sharded) or ``model.safetensors``, as
    transformers' ``save_pretrained`` writes them.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FingerprintError(f"model directory {model_dir} does not exist")
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return {name: str(model_dir / file) for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise FingerprintError(f"{index}: malformed index ({error!r})") from None
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {name: str(single) for name in handle.keys()}
    raise FingerprintError(
        f"{model_dir}: no model.safetensors; mergekit-lrp never unpickles weights. "
        "Convert the checkpoint first (from_pretrained, then save_pretrained)."
    )


def _sample(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1}) if n > 0 else []


def fingerprint_tensors(tensor_files: dict[str, str]) -> str:
    """Hash names, shapes and sampled rows of the given tensors (see module doc)."""
    digest = hashlib.sha256(SCHEME.encode())
    handles = {}
    try:
        for name in sorted(tensor_files):
            file = tensor_files[name]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt")
            piece = handles[file].get_slice(name)
            shape = piece.get_shape()
            digest.update(f"{name}\0{shape}\0".encode())
            if len(shape) == 0 or (len(shape) == 1 and shape[0] <= 65536):
                values = handles[file].get_tensor(name).reshape(-1)
            elif len(shape) == 1:
                values = torch.cat([piece[i : i + 1] for i in _sample(shape[0])])
            else:
                lead = [_sample(n) for n in shape[:-1]]
                values = torch.cat(
                    [
                        piece[tuple(slice(i, i + 1) for i in index)].reshape(-1)
                        for index in itertools.product(*lead)
                    ]
                )
            if values.is_floating_point():
                data = values.to(torch.bfloat16).view(torch.int16)
            else:
                data = values.to(torch.int64)
            digest.update(data.numpy().tobytes())
    finally:
        handles.clear()
    return digest.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    return fingerprint_tensors(checkpoint_tensor_files(model_dir))


#: a score file computed on a base with a PEFT adapter merged in is fingerprinted by both
ADAPTER_SCHEME = "base+adapter-v1"
#: adapter_config.json fields that say where things are, not what the merged weights are
_ADAPTER_LOCATION_FIELDS = ("base_model_name_or_path", "revision")


def adapter_fingerprint(base_fingerprint: str, adapter_dir: str | os.PathLike) -> str:
    """The fingerprint of ``base + adapter``: the base checkpoint's fingerprint, the
    adapter's weights (sampled rows, as for checkpoints) and its configuration (rank,
    scaling, target modules). It does not depend on the dtype the adapter is merged in,
    so one score file serves mergekit's ``model: base+adapter`` at any
    ``--lora-merge-dtype``."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FingerprintError(
            f"{adapter_dir}: no adapter_model.safetensors; mergekit-lrp never unpickles "
            "weights (save the adapter with safe_serialization=True)"
        )
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FingerprintError(f"{adapter_dir}: unreadable adapter_config.json ({error})") from None
    for name in _ADAPTER_LOCATION_FIELDS:
        config.pop(name, None)
    with safe_open(str(weights), framework="pt") as handle:
        files = {name: str(weights) for name in handle.keys()}
    digest = hashlib.sha256(ADAPTER_SCHEME.encode())
    digest.update(base_fingerprint.encode())
    digest.update(fingerprint_tensors(files).encode())
    digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()

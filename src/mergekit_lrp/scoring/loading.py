"""Loading for ``lrp-compute``: the device, lxt, the config, the tokenizer (each checked
before any weight is read), and the checkpoint itself (weights in the pass's dtype, its
fingerprint, the names it stores each scored parameter under)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_lrp.scores.fingerprint import (
    adapter_fingerprint,
    checkpoint_tensor_files,
    fingerprint_tensors,
)
from mergekit_lrp.scoring.checkpoint_names import checkpoint_names
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.sources import (
    ModelSource,
    merge_adapter,
    resolve_model_dir,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ComputeError(f"--device {device} was given but no CUDA device is available")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ComputeError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ComputeError("--device mps was given but no MPS device is available")
    return torch.device(device)


def check_lxt() -> None:
    from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

    try:
        load_lxt_rules()
    except ImportError as error:
        raise ComputeError(str(error)) from None


def load_config(model: str, revision: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as error:
        raise ComputeError(f"{model}: no usable config.json ({_first_line(error)})") from None


def load_tokenizer(source: str, revision: str | None, model: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, ImportError, TypeError) as error:
        hint = "" if source != model else "; pass --tokenizer to take it from elsewhere"
        raise ComputeError(f"{source}: no usable tokenizer ({_first_line(error)}){hint}") from None
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise ComputeError(f"{source}: no usable tokenizer; pass --tokenizer")
    tokenizer.truncation_side = "left"  # the predicted token comes at the end
    return tokenizer


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@dataclass(frozen=True)
class Source:
    """What a score file says it was computed from."""

    model: ModelSource
    revision: str | None
    prompts: str
    model_type: str


@dataclass
class LoadedCheckpoint:
    """The model being scored and what the score file must say about its checkpoint."""

    net: torch.nn.Module
    dtype: torch.dtype
    tensor_files: dict[str, str]
    fingerprint: str
    #: score name -> the parameter scored under it
    scored: dict[str, torch.nn.Parameter]
    #: other names of tied parameters -> score name
    aliases: dict[str, str]
    #: parameters stored as several checkpoint tensors -> their names (MoE experts)
    converted: dict[str, list[str]]


def load_checkpoint(source: Source, options: ComputeOptions, device) -> LoadedCheckpoint:
    """The weights on ``device`` in the pass's dtype, the checkpoint's fingerprint, and the
    checkpoint name each scored parameter is stored under."""
    dtype = DTYPES.get(options.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    model_dir = resolve_model_dir(source.model.base, source.revision)
    tensor_files = checkpoint_tensor_files(model_dir)
    fingerprint = fingerprint_tensors(tensor_files)
    net = _load(model_dir, options, device, dtype)
    if source.model.adapter is not None:
        adapter_dir = resolve_model_dir(source.model.adapter)
        fingerprint = adapter_fingerprint(fingerprint, adapter_dir)
        net = merge_adapter(net, adapter_dir)
    stored_to_param, aliases, converted = checkpoint_names(net, tensor_files)
    params = dict(net.named_parameters())
    scored = {stored: params[name] for stored, name in stored_to_param.items()}
    return LoadedCheckpoint(net, dtype, tensor_files, fingerprint, scored, aliases, converted)


def _load(model_dir: Path, options: ComputeOptions, device: torch.device, dtype):
    from transformers import AutoModelForCausalLM

    if options.device_map is not None:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map=options.device_map
        )
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)

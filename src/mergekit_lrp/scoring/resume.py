"""Resume files: where an interrupted ``lrp-compute`` run left its sums, in what format,
and whether a new run may continue them (same model, prompts, options and process
layout).

A resume file is a safetensors file of an accumulator's float32 running sums
(:meth:`~.accumulator.Accumulator.totals`) with the loop state and the run's signature as
JSON in its metadata, written atomically like score files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.file import atomic_save
from mergekit_lrp.scoring.accumulator import Accumulator
from mergekit_lrp.scoring.distributed import Workers
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.prompts import Prompt
from mergekit_lrp.scoring.relevance import PassResult

RESUME_FORMAT = "mergekit-lrp-resume"


class ResumeError(LrpError):
    """A resume checkpoint is unreadable or was made with other inputs."""


def resume_path(output: str | Path, workers: Workers | None = None) -> Path:
    """Where a run writing ``output`` keeps its resume file; one per process when shared."""
    output = Path(output)
    suffix = ""
    if workers is not None and workers.world_size > 1:
        suffix = f".rank{workers.rank}-of-{workers.world_size}"
    return output.with_name(output.name + ".resume" + suffix)


def check_resume_layout(output: Path, workers: Workers) -> None:
    """Refuse to start while resume files of a run with another number of processes exist:
    a resume would silently start over, and they would be left behind."""
    ours = {resume_path(output, replace(workers, rank=rank)) for rank in range(workers.world_size)}
    foreign = sorted(p for p in output.parent.glob(f"{output.name}.resume*") if p not in ours)
    if foreign:
        raise ComputeError(
            f"{foreign[0]} is a checkpoint of an interrupted run with another number of "
            f"processes (this run has {workers.world_size}); rerun with that layout and "
            "--resume, or delete it to start over"
        )


def run_signature(
    fingerprint: str, prompts: list[Prompt], options: ComputeOptions, dtype, workers: Workers
) -> dict:
    """What a resume file must agree on to be continued."""
    digest = hashlib.sha256(json.dumps([p.key() for p in prompts]).encode()).hexdigest()
    signature = {
        "model_fingerprint": fingerprint,
        "prompts_sha256": digest,
        "max_length": options.max_length,
        "target": options.target,
        "method": options.method,
        "dtype": str(dtype),
        "process": f"{workers.rank} of {workers.world_size}",
    }
    if options.signal.is_gram:  # the token weights are in the sums
        signature["token_weighting"] = options.signal.token_weighting
    return signature


@dataclass
class LoopState:
    """Where the prompt loop is; the first three fields go into resume files."""

    done: int = 0
    tokens: int = 0
    truncated: int = 0
    last: PassResult | None = None

    def resume_fields(self) -> dict:
        return {"done": self.done, "tokens": self.tokens, "truncated": self.truncated}


def start_state(
    resume_file: Path, accumulator: Accumulator, signature: dict, resume: bool
) -> LoopState:
    """A fresh state, or the one saved in ``resume_file`` (its sums loaded) when resuming."""
    if not resume_file.exists():
        return LoopState()
    if not resume:
        raise ComputeError(
            f"{resume_file} holds an interrupted run; pass --resume to continue it "
            "or delete it to start over"
        )
    saved = load_sums(resume_file, accumulator.totals())
    differs = [k for k in signature if saved.get("signature", {}).get(k) != signature[k]]
    if differs:
        raise ResumeError(
            f"{resume_file} was made with other inputs ({', '.join(differs)} differ); "
            "delete it or rerun with the original options"
        )
    return LoopState(saved["done"], saved["tokens"], saved["truncated"])


def save_state(
    resume_file: Path, accumulator: Accumulator, signature: dict, state: LoopState
) -> None:
    save_sums(resume_file, accumulator.totals(), {"signature": signature, **state.resume_fields()})


def save_sums(path: Path, sums: Mapping[str, torch.Tensor], state: Mapping[str, object]) -> None:
    """Checkpoint ``sums`` and the loop ``state`` (JSON) for ``--resume``."""
    header = {"format": RESUME_FORMAT, "state": json.dumps(dict(state), sort_keys=True)}
    atomic_save(path, {name: total.cpu() for name, total in sums.items()}, header)


def load_sums(path: Path, sums: Mapping[str, torch.Tensor]) -> dict:
    """Restore ``sums`` in place from a checkpoint; return its loop state."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            if header.get("format") != RESUME_FORMAT:
                raise ResumeError(f"{path}: not an lrp-compute resume checkpoint")
            if set(handle.keys()) != set(sums):
                raise ResumeError(
                    f"{path}: checkpoint tensors do not match this model's parameters"
                )
            for name, total in sums.items():
                saved = handle.get_tensor(name)
                if saved.shape != total.shape or saved.dtype != torch.float32:
                    raise ResumeError(f"{path}: checkpoint tensor {name!r} does not match")
                total.copy_(saved)
            return json.loads(header["state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise ResumeError(f"{path}: unreadable resume checkpoint ({error})") from None

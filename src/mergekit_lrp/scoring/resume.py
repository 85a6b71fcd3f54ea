"""Resume files: where an interrupted ``lrp-compute`` run left its sums, and whether a
new run may continue them (same model, prompts, options and process layout)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from mergekit_lrp.scoring.accumulator import GradientAccumulator, ResumeError
from mergekit_lrp.scoring.distributed import Workers
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.prompts import Prompt
from mergekit_lrp.scoring.relevance import PassResult


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
    return {
        "model_fingerprint": fingerprint,
        "prompts_sha256": digest,
        "max_length": options.max_length,
        "target": options.target,
        "method": options.method,
        "dtype": str(dtype),
        "process": f"{workers.rank} of {workers.world_size}",
    }


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
    resume_file: Path, accumulator: GradientAccumulator, signature: dict, resume: bool
) -> LoopState:
    """A fresh state, or the one saved in ``resume_file`` (its sums loaded) when resuming."""
    if not resume_file.exists():
        return LoopState()
    if not resume:
        raise ComputeError(
            f"{resume_file} holds an interrupted run; pass --resume to continue it "
            "or delete it to start over"
        )
    saved = accumulator.load(resume_file)
    differs = [k for k in signature if saved.get("signature", {}).get(k) != signature[k]]
    if differs:
        raise ResumeError(
            f"{resume_file} was made with other inputs ({', '.join(differs)} differ); "
            "delete it or rerun with the original options"
        )
    return LoopState(saved["done"], saved["tokens"], saved["truncated"])


def save_state(
    resume_file: Path, accumulator: GradientAccumulator, signature: dict, state: LoopState
) -> None:
    accumulator.save(resume_file, {"signature": signature, **state.resume_fields()})

"""What ``lrp-compute`` prints when it is done."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lrp.scoring.relevance import PassResult


@dataclass
class ComputeSummary:
    output: Path
    prompts: int
    tokens: int
    truncated: int
    seconds: float
    peak_memory_bytes: int
    last: PassResult | None
    resumed_from: int = 0
    unscored_tensors: list[str] = field(default_factory=list)
    processes: int = 1
    main_process: bool = True  # only the first of several processes reports

    @property
    def conservation(self) -> float:
        """Input relevance / target logit on the last prompt (1.0 = conserved)."""
        if self.last is None or not self.last.target:
            return float("nan")
        return self.last.input_relevance / self.last.target

    def lines(self) -> list[str]:
        if not self.main_process:
            return []
        rate = (self.prompts - self.resumed_from) / self.seconds if self.seconds else 0.0
        lines = [
            f"wrote {self.output}"
            + (f" (prompts shared by {self.processes} processes)" if self.processes > 1 else ""),
            f"prompts: {self.prompts} ({self.resumed_from} from checkpoint), "
            f"tokens: {self.tokens}, truncated to --max-length: {self.truncated}",
            f"time: {self.seconds:.1f} s ({rate:.2f} prompts/s), "
            f"peak memory: {self.peak_memory_bytes / 2**30:.2f} GiB"
            + (" (largest process)" if self.processes > 1 else ""),
        ]
        if self.last is not None:
            lines.append(
                f"conservation on the last prompt: input relevance {self.last.input_relevance:.4g}"
                f" / target logit {self.last.target:.4g} = {self.conservation:.3f}"
            )
        if self.unscored_tensors:
            shown = ", ".join(self.unscored_tensors[:3])
            lines.append(
                f"{len(self.unscored_tensors)} checkpoint tensor(s) are not used by the model "
                f"class and have no scores ({shown}, ...): merge them with missing_scores: base"
            )
        return lines


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":  # every GPU a device map may have used
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    try:
        import resource  # Unix only
    except ImportError:
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

"""What ``lrp-compute`` prints when it is done."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergekit_lrp.scoring.relevance import PassResult
from mergekit_lrp.scoring.signals import SIGNALS, Signal

#: fewer tokens than this on average is a sign of a wrong tokenizer or empty prompts
MIN_TOKENS_PER_PROMPT = 4


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
    #: the unscored tensors of two or more dimensions: the merge reads scores for those
    #: (protect_special keeps 1-D tensors whole)
    unscored_matrices: list[str] = field(default_factory=list)
    #: tensors whose scores were zero everywhere, left out of the file
    no_relevance: list[str] = field(default_factory=list)
    #: gram: checkpoint matrices without a Gram matrix, by reason
    without_gram: dict[str, list[str]] = field(default_factory=dict)
    #: gram: (number of Gram matrices, bytes written)
    gram: tuple[int, int] | None = None
    #: gram: the rank of each matrix stored factored (--gram-form factored)
    factored_ranks: list[int] = field(default_factory=list)
    signal: Signal = SIGNALS["attnlrp"]
    #: the choices ``auto`` options made, when not printed as they were made
    notes: list[str] = field(default_factory=list)
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
        lines += self.notes
        if self.last is not None and self.signal.rules:
            lines.append(
                f"conservation on the last prompt: input relevance {self.last.input_relevance:.4g}"
                f" / target logit {self.last.target:.4g} = {self.conservation:.3f} (the share "
                "of the target's relevance that reached the input embeddings; AttnLRP's "
                "softmax rule absorbs part of it: 0.25-0.49 on SmolLM2-135M-Instruct, the "
                "same as lxt's own implementation, about 0.3 on the demo's toy experts; see "
                "docs/attnlrp.md, Conservation)"
            )
        needed = [n for n in self.unscored_matrices if n not in self.no_relevance]
        if self.signal.is_gram:
            lines += self.gram_lines()
        elif needed and self.signal.backward:
            lines.append(
                f"{_matrices(len(needed))} are not used by the model class and "
                f"have no scores ({', '.join(needed[:3])}, ...): merge them with "
                "missing_scores: base"
            )
        elif needed:
            lines.append(
                f"{_matrices(len(needed))} get no {self.signal.name} "
                f"statistics (only linear layers and embeddings do: {', '.join(needed[:3])}, "
                "...): merge them with missing_scores: magnitude (|delta|) or base"
            )
        if self.no_relevance:
            lines.append(
                f"warning: {len(self.no_relevance)} tensor(s) got no relevance on these prompts "
                f"and were left out ({', '.join(self.no_relevance[:3])}, ...): merge them with "
                "missing_scores: magnitude or base"
            )
        return lines + self.warnings()

    def gram_lines(self) -> list[str]:
        """What a Gram file holds, and which matrices it has no Gram matrix for."""
        lines = []
        if self.gram is not None:
            count, size = self.gram
            lines.append(
                f"Gram matrices: {count} ({size / 2**20:.1f} MiB), tokens weighted: "
                f"{self.signal.token_weighting}"
            )
            ranks = self.factored_ranks
            if ranks:
                lines.append(
                    f"factored: {len(ranks)} of {count}, rank {min(ranks)} to {max(ranks)} "
                    "(low rank plus the exact diagonal; the others stored whole)"
                )
        missing = sum(len(names) for names in self.without_gram.values())
        if missing:
            reasons = "; ".join(
                f"{reason}: {len(names)} ({', '.join(names[:2])}"
                + (", ...)" if len(names) > 2 else ")")
                for reason, names in self.without_gram.items()
            )
            lines.append(
                f"{_matrices(missing)} have no Gram matrix ({reasons}): a merge "
                "reading the file handles them by its own rule"
            )
        return lines

    def warnings(self) -> list[str]:
        """Signs that the prompts did not exercise the model as intended."""
        found = []
        if self.prompts and self.tokens / self.prompts < MIN_TOKENS_PER_PROMPT:
            found.append(
                f"warning: prompts average {self.tokens / self.prompts:.1f} tokens; check that "
                "the tokenizer fits the model and that the prompts are the task's"
            )
        if self.last is not None and self.signal.rules and not self.last.target:
            found.append(
                "warning: the target logit of the last prompt is 0, so conservation is "
                "undefined; the model's output may not depend on its input"
            )
        return found


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":  # every GPU a device map may have used
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    try:
        import resource  # Unix only
    except ImportError:
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _matrices(count: int) -> str:
    return f"{count} checkpoint matri{'x' if count == 1 else 'ces'}"

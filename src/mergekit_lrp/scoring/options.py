"""``lrp-compute``'s options: one definition, one set of defaults, validated in one place.

The CLI (:mod:`.cli`) reads its defaults and choices from here, and the library checks
every value when :class:`ComputeOptions` is built, so both entry points refuse the same
inputs with the same messages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scores.gram_forms import DEFAULT_TOLERANCE
from mergekit_lrp.scoring.relevance import TARGETS
from mergekit_lrp.scoring.signals import SIGNALS, TOKEN_WEIGHTINGS, Signal, signal_of

#: tokens per prompt when --max-length is not given (capped at the model's positions)
DEFAULT_MAX_LENGTH = 512
#: dtype of the weights during the pass; ``auto`` = float32 on CPU, bfloat16 on CUDA
WEIGHT_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: dtype of the stored scores (accumulation is float32 either way)
SCORE_DTYPES = ("float32", "bfloat16")
#: the stored dtype when --score-dtype is not given: bfloat16 halves a score file; Gram
#: matrices stay float32 (rounding them changes the merge's solve)
DEFAULT_SCORE_DTYPE = "bfloat16"
GRAM_SCORE_DTYPE = "float32"
ACCUMULATE_ON = ("auto", "device", "cpu")
#: how a Gram file stores each matrix (scores.gram_forms)
GRAM_FORMS = ("dense", "factored")
#: also ``cuda:N`` for one GPU of several
DEVICES = ("auto", "cpu", "cuda", "mps")


class ComputeError(LrpError):
    """Bad input to lrp-compute (model, output path, options)."""


@dataclass(frozen=True)
class ComputeOptions:
    #: the importance signal (:mod:`.signals`)
    method: str = "attnlrp"
    #: --method gram: how each prompt's tokens are weighted (None: ``none``); refused with
    #: another method
    token_weighting: str | None = None
    #: --method gram: each matrix whole, or low rank plus its diagonal where smaller
    gram_form: str = "dense"
    #: --gram-form factored: the bound on each matrix's relative error (2-norm)
    gram_tolerance: float = DEFAULT_TOLERANCE
    #: --gram-form factored: the most eigenpairs a matrix keeps (None: as the bound needs)
    gram_max_rank: int | None = None
    #: tokens per prompt; None: :data:`DEFAULT_MAX_LENGTH`, or the model's
    #: ``max_position_embeddings`` when smaller (:func:`decide_max_length`)
    max_length: int | None = None
    num_prompts: int | None = None
    #: split and column of a dataset source (see :mod:`.prompts`)
    split: str | None = None
    column: str | None = None
    #: where the tokenizer comes from when not the model's directory
    tokenizer: str | None = None
    #: hub revision (branch, tag or commit) of a hub model
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    target: str = "predicted"
    #: bfloat16 halves the file; 3 in 10,000 top-k entries flip (docs/BENCHMARKS.md).
    #: None: :data:`DEFAULT_SCORE_DTYPE`, or :data:`GRAM_SCORE_DTYPE` for --method gram
    score_dtype: str | None = None
    resume: bool = False
    overwrite: bool = False
    #: prompts between two resume checkpoints (``--checkpoint-every``)
    checkpoint_every: int = 100
    #: True, False, or "auto": on only when a --max-length prompt's activations do not fit
    #: (:func:`.placement.plan` decides, for the CLI and the Python API alike)
    gradient_checkpointing: bool | str = "auto"
    #: where the float32 sums live: "device" (each parameter's), "cpu", or "auto"
    accumulate_on: str = "auto"
    progress: bool = True
    #: CPU threads (``--threads``); None: :func:`.placement.decide_threads`
    threads: int | None = None
    #: passed to ``from_pretrained``: "auto" spreads a model too big for one GPU over all
    #: of them; a dict maps module names to devices
    device_map: str | dict | None = None

    def __post_init__(self):
        if self.score_dtype is None:
            chosen = GRAM_SCORE_DTYPE if self.method == "gram" else DEFAULT_SCORE_DTYPE
            object.__setattr__(self, "score_dtype", chosen)
        if not re.fullmatch(r"cuda:\d+", str(self.device)) and self.device not in DEVICES:
            raise ComputeError(f"--device must be one of {', '.join(DEVICES)} or cuda:N")
        for name, allowed in (
            ("dtype", WEIGHT_DTYPES),
            ("score_dtype", SCORE_DTYPES),
            ("target", TARGETS),
            ("method", tuple(SIGNALS)),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ComputeError(f"--{_flag(name)} must be one of {', '.join(allowed)}")
        if self.token_weighting is not None:
            if self.method != "gram":
                raise ComputeError(
                    f"--token-weighting weights the tokens of --method gram's Gram matrices; "
                    f"--method {self.method} has no token weights: drop --token-weighting or "
                    "pass --method gram"
                )
            if self.token_weighting not in TOKEN_WEIGHTINGS:
                raise ComputeError(
                    f"--token-weighting must be one of {', '.join(TOKEN_WEIGHTINGS)}"
                )
        self._check_gram_form()
        minimums = (("max_length", 2), ("checkpoint_every", 1), ("num_prompts", 1), ("threads", 1))
        for name, minimum in minimums:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ComputeError(f"--{_flag(name)} must be an integer of at least {minimum}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ComputeError("--gradient-checkpointing must be on, off or auto")
        if self.accumulate_on not in ACCUMULATE_ON:
            raise ComputeError(f"--accumulate-on must be one of {', '.join(ACCUMULATE_ON)}")
        if self.device_map is not None and self.device_map != "auto":
            if not isinstance(self.device_map, dict):
                raise ComputeError("--device-map must be 'auto' (or, from Python, a dict)")

    def _check_gram_form(self) -> None:
        if self.gram_form not in GRAM_FORMS:
            raise ComputeError(f"--gram-form must be one of {', '.join(GRAM_FORMS)}")
        tuned = self.gram_tolerance != DEFAULT_TOLERANCE or self.gram_max_rank is not None
        if self.method != "gram" and (self.gram_form != "dense" or tuned):
            raise ComputeError(
                "--gram-form, --gram-tolerance and --gram-max-rank store --method gram's Gram "
                f"matrices; --method {self.method} writes none: drop them or pass --method gram"
            )
        if self.gram_form == "dense" and tuned:
            raise ComputeError(
                "--gram-tolerance and --gram-max-rank choose the rank of factored Gram "
                "matrices: add --gram-form factored, or drop them to store every matrix whole"
            )
        if not (isinstance(self.gram_tolerance, float | int) and 0 < self.gram_tolerance < 1):
            raise ComputeError(
                f"--gram-tolerance must be above 0 and below 1 (a relative error bound), "
                f"not {self.gram_tolerance!r}"
            )
        if self.gram_max_rank is not None and (
            not isinstance(self.gram_max_rank, int) or self.gram_max_rank < 1
        ):
            raise ComputeError("--gram-max-rank must be an integer of at least 1")

    @property
    def signal(self) -> Signal:
        """The importance signal ``method`` (and ``token_weighting``) name (validated on
        construction)."""
        return signal_of(self.method, self.token_weighting)


def decide_max_length(options: ComputeOptions, config) -> ComputeOptions:
    """``options`` with ``max_length`` decided for a model of ``config``: the default is
    capped at the positions the model was trained on; a larger --max-length is refused
    (those positions would be scored, silently, on untrained position embeddings)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None)
    if options.max_length is None:
        value = DEFAULT_MAX_LENGTH if not limit else min(DEFAULT_MAX_LENGTH, int(limit))
        return replace(options, max_length=value)
    if limit and options.max_length > limit:
        raise ComputeError(
            f"--max-length {options.max_length} exceeds the {limit} positions the model was "
            f"trained on (max_position_embeddings); pass --max-length {limit} or less"
        )
    return options


def default(name: str):
    """The default of option ``name`` (for the CLI)."""
    return next(f.default for f in fields(ComputeOptions) if f.name == name)


def _flag(name: str) -> str:
    return name.replace("_", "-")

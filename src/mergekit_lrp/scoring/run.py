"""``lrp-compute`` behind the CLI: check the inputs, load, score, write.

Under torchrun or accelerate launch the prompts are shared by the processes (see
:mod:`.distributed`) and the first process writes the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch

from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import (
    ADAPTER_SCHEME,
    SCHEME,
    adapter_fingerprint,
    checkpoint_tensor_files,
    fingerprint_tensors,
)
from mergekit_lrp.scoring.accumulator import new_accumulator
from mergekit_lrp.scoring.checkpoint_names import checkpoint_layout, checkpoint_names
from mergekit_lrp.scoring.distributed import Workers, joined_workers, launched_world_size
from mergekit_lrp.scoring.loop import run_prompts
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions, decide_max_length
from mergekit_lrp.scoring.placement import decide_threads, plan
from mergekit_lrp.scoring.prompts import Prompt, read_records, tokenize_records
from mergekit_lrp.scoring.resume import (
    check_resume_layout,
    resume_path,
    run_signature,
    save_state,
    start_state,
)
from mergekit_lrp.scoring.sources import (
    ModelSource,
    merge_adapter,
    parse_model_source,
    resolve_model_dir,
)
from mergekit_lrp.scoring.summary import ComputeSummary, peak_memory

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


def check_output(output: Path, options: ComputeOptions) -> None:
    """Create the output's folder and make sure it is writable: fail now, not after hours."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ComputeError(f"cannot create output directory {output.parent} ({error})") from None
    if output.is_dir():
        example = output / "scores.safetensors"
        raise ComputeError(f"output {output} is a folder; name the score file, e.g. -o {example}")
    if output.exists() and not options.overwrite:
        raise ComputeError(f"output {output} already exists; pass --overwrite to replace it")
    try:
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as error:
        raise ComputeError(f"cannot write to {output.parent} ({error.strerror})") from None


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


def compute_scores(model: str, prompts_path: str, output: str, options: ComputeOptions):
    """Compute and write the score file of ``model`` (a directory or hub id, ``BASE+ADAPTER``
    or a PEFT adapter folder: :mod:`.sources`); returns a
    :class:`~mergekit_lrp.scoring.summary.ComputeSummary`.

    Every input is checked before the weights are loaded or downloaded: lxt, the output
    folder, the prompts, the config and architecture, --max-length, the tokenizer.
    """
    from mergekit_lrp.scoring.attnlrp import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError

    output_path = Path(output)
    check_lxt()
    check_output(output_path, options)
    if options.device_map is not None and launched_world_size() > 1:
        raise ComputeError(
            "--device-map spreads one model over this machine's GPUs; it cannot be combined "
            "with several processes (torchrun / accelerate launch), which each load a copy"
        )
    model_source = parse_model_source(model)
    records = read_records(prompts_path, options.split, options.column, options.num_prompts)
    config = load_config(model_source.base, options.revision)
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(model_type)
    options = decide_max_length(options, config)
    tokenizer_source = options.tokenizer or model_source.tokenizer_source
    tokenizer = load_tokenizer(tokenizer_source, options.revision, model)
    prompts = tokenize_records(records, tokenizer, options.signal.chat_target or options.target)
    if options.signal.backward and all(len(prompt.ids) < 2 for prompt in prompts):
        raise ComputeError(
            f"every prompt of {prompts_path} is one token with the tokenizer of "
            f"{tokenizer_source}, and a backward pass needs at least two (attention over one "
            "token gives the query and key weights nothing): check that the tokenizer fits "
            "the model (--tokenizer) and that the prompts are not empty"
        )
    device = pick_device(options.device)
    source = Source(model_source, options.revision, str(prompts_path), model_type)
    with joined_workers(use_cuda=device.type == "cuda") as workers, _cpu_threads(
        options, device
    ) as note:
        if device.type == "cuda" and workers.world_size > 1:
            device = torch.device("cuda", workers.local_rank)
        if note and options.progress and workers.is_main:
            print(note, file=sys.stderr)
        return _score_checkpoint(source, prompts, output_path, options, device, workers)


@contextlib.contextmanager
def _cpu_threads(options: ComputeOptions, device: torch.device):
    """torch's threads for a pass on the CPU (:func:`.placement.decide_threads`), restored
    afterwards; yields the note saying what was chosen, if anything was."""
    if device.type != "cpu":
        yield None
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = max(1, len(os.sched_getaffinity(0)) // processes)
    threads, note = decide_threads(options.threads, cores=cores)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield note
    finally:
        torch.set_num_threads(before)


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


def _score_checkpoint(
    source: Source,
    prompts: list[Prompt],
    output_path: Path,
    options: ComputeOptions,
    device: torch.device,
    workers: Workers,
) -> ComputeSummary:
    """Load, decide placement, resume, run this process's prompts, sum over processes,
    write (first process), summarise."""
    loaded = _load_checkpoint(source, options, device)
    placement = plan(options, loaded.net, loaded.scored, loaded.dtype)
    if options.progress and workers.is_main:
        for note in placement.notes:
            print(note, file=sys.stderr)
    options = replace(options, gradient_checkpointing=placement.checkpointing)
    signal = options.signal
    # Gram matrices are named after checkpoint tensors: layers fused on load have none
    scored = loaded.scored
    if signal.is_gram:
        scored = {name: p for name, p in scored.items() if name not in loaded.converted}
    probe = torch.tensor(prompts[0].ids[-options.max_length :])
    accumulator = new_accumulator(
        loaded.net, scored, signal, placement.sums_on_device, probe=probe
    )
    signature = run_signature(loaded.fingerprint, prompts, options, loaded.dtype, workers)
    resume_file = resume_path(output_path, workers)
    check_resume_layout(output_path, workers)
    state = start_state(resume_file, accumulator, signature, options.resume)
    started = time.perf_counter()
    resumed_from = state.done

    loop_options = replace(options, progress=options.progress and workers.is_main)
    run_prompts(
        loaded.net,
        workers.share(prompts),
        loop_options,
        accumulator,
        state,
        lambda current: save_state(resume_file, accumulator, signature, current),
    )
    workers.sum_tensors(accumulator.totals(), device)
    tokens, truncated, resumed_from = workers.sum_counts(
        [state.tokens, state.truncated, resumed_from], device
    )
    written = None
    if workers.is_main:
        metadata = _metadata(source, loaded, options, len(prompts), tokens)
        write = _write_gram if signal.is_gram else _write
        written = write(output_path, accumulator, loaded, metadata, options, len(prompts))
    workers.barrier()  # every resume file stays until the score file is written
    resume_file.unlink(missing_ok=True)
    return ComputeSummary(
        output=output_path,
        prompts=len(prompts),
        tokens=tokens,
        truncated=truncated,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=workers.max_count(peak_memory(device), device),
        last=state.last,
        resumed_from=resumed_from,
        unscored_tensors=written.unscored if written else [],
        unscored_matrices=written.unscored_matrices if written else [],
        no_relevance=written.no_relevance if written else [],
        without_gram=written.without_gram if written else {},
        gram=written.gram if written else None,
        signal=options.signal,
        notes=[] if options.progress else list(placement.notes),
        processes=workers.world_size,
        main_process=workers.is_main,
    )


def _load_checkpoint(source: Source, options: ComputeOptions, device) -> LoadedCheckpoint:
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


def _metadata(source: Source, loaded, options, count: int, tokens: int) -> ScoreMetadata:
    signal = options.signal
    extra = {"token_weighting": signal.token_weighting} if signal.token_weighting else {}
    return ScoreMetadata(
        model_fingerprint=loaded.fingerprint,
        num_prompts=count,
        num_tokens=tokens,
        target=signal.target(options.target),
        model_type=source.model_type,
        method=signal.name,
        quantity=signal.quantity,
        fingerprint_scheme=ADAPTER_SCHEME if source.model.adapter else SCHEME,
        generator=f"mergekit-lrp {version('mergekit-lrp')}",
        extra={
            "max_length": str(options.max_length),
            "dtype": str(loaded.dtype),
            "model": source.model.given,
            "revision": source.revision or "",
            "prompts": source.prompts,
            **extra,
        },
    )


@dataclass(frozen=True)
class Written:
    #: checkpoint tensors the file has no scores for (the model class does not use them,
    #: or the signal measures nothing for them)
    unscored: list[str]
    #: those of two or more dimensions
    unscored_matrices: list[str]
    #: tensors whose scores were zero everywhere, left out of the file
    no_relevance: list[str]
    #: gram: checkpoint matrices without a Gram matrix, by reason
    without_gram: dict[str, list[str]] = field(default_factory=dict)
    #: gram: (number of Gram matrices, bytes written for them)
    gram: tuple[int, int] | None = None


def _write(output_path: Path, accumulator, loaded, metadata, options, count: int) -> Written:
    """Check the scores, name them as the checkpoint does, write the file atomically."""
    scores = accumulator.scores(count)
    no_relevance = check_scores(scores, accumulator.seen, output_path)
    scores = {name: value for name, value in scores.items() if name not in no_relevance}
    scores = checkpoint_layout(loaded.net, scores, loaded.converted)
    aliases = {a: s for a, s in loaded.aliases.items() if s in scores}
    metadata = replace(metadata, aliases=aliases)
    write_scores(output_path, scores, metadata, dtype=DTYPES[options.score_dtype])
    unscored = sorted(set(loaded.tensor_files) - set(scores) - set(aliases))
    matrices = [name for name in unscored if len(_stored_shape(loaded.tensor_files, name)) > 1]
    return Written(unscored, matrices, no_relevance)


def _write_gram(output_path: Path, accumulator, loaded, metadata, options, count: int) -> Written:
    """Check the Gram matrices, record which weight reads which, write the file atomically."""
    grams = accumulator.scores(count)
    weighting = options.signal.token_weighting
    for name, value in grams.items():
        if not torch.isfinite(value).all():
            raise ComputeError(
                f"the Gram matrix {name!r} is not finite (NaN or Inf); {output_path} was not "
                "written. Try --dtype float32"
            )
        if not value.any():
            hint = (
                " (--token-weighting answer weights only the tokens the next-token target "
                "scores: prompts of one token, or chats whose answer is cut off, have none)"
                if weighting == "answer"
                else ""
            )
            raise ComputeError(
                f"the Gram matrix {name!r} is zero: no token of these prompts gave that "
                f"layer an input{hint}; {output_path} was not written. Check the prompts"
            )
    metadata = replace(metadata, gram_of=dict(accumulator.gram_of), aliases={})
    dtype = DTYPES[options.score_dtype]
    write_scores(output_path, grams, metadata, dtype=dtype)
    size = sum(value.numel() for value in grams.values()) * dtype.itemsize
    reasons = dict(accumulator.unhooked)
    for name in loaded.converted:
        reasons[name] = "fused on load (experts), not nn.Linear"
    without: dict[str, list[str]] = {}
    for name in sorted(set(loaded.tensor_files) - set(accumulator.gram_of)):
        if len(_stored_shape(loaded.tensor_files, name)) < 2:
            continue
        reason = reasons.get(_owner(name, loaded), "not used by the model class")
        without.setdefault(reason, []).append(name)
    unscored = sorted(set(loaded.tensor_files) - set(accumulator.gram_of))
    matrices = [n for reason_names in without.values() for n in reason_names]
    return Written(unscored, sorted(matrices), [], without, (len(grams), size))


def _owner(name: str, loaded) -> str:
    """The score name holding checkpoint tensor ``name`` (a fused parameter's, an alias's
    storage, or its own)."""
    for fused, parts in loaded.converted.items():
        if name in parts:
            return fused
    return loaded.aliases.get(name, name)


def _stored_shape(tensor_files: dict[str, str], name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(tensor_files[name], framework="pt") as handle:
        return tuple(handle.get_slice(name).get_shape())


def check_scores(scores: dict[str, torch.Tensor], seen: set[str], output: Path) -> list[str]:
    """Refuse scores that would make a merge arbitrary; return the tensors to leave out.

    Non-finite scores stop the run with no file written, and so do matrices whose scores
    are zero everywhere although gradients reached them: the model's output did not
    depend on them for these prompts (a tokenizer that turned every prompt into padding,
    a model that ignores its input), so a merge would rank their entries by index order.
    Tensors that no gradient reached (MoE routers, which AttnLRP treats as constants) and
    all-zero vectors are left out of the file: a merge then needs ``missing_scores``.
    """
    for name, value in scores.items():
        if not torch.isfinite(value).all():
            raise ComputeError(
                f"scores of {name!r} are not finite (NaN or Inf); {output} was not written. "
                "Try --dtype float32"
            )
    zero = sorted(name for name, value in scores.items() if not value.any())
    dead = [name for name in zero if name in seen and scores[name].ndim >= 2]
    if dead or len(zero) == len(scores):
        shown = ", ".join(dead[:3] or zero[:3])
        raise ComputeError(
            f"the scores of {len(dead) or len(zero)} tensor(s) are zero everywhere ({shown}, "
            f"...), so their entries cannot be ranked; {output} was not written. The model's "
            "output does not depend on them for these prompts: check that the tokenizer fits "
            "the model and that the prompts are not empty or all padding"
        )
    return zero

"""``lrp-compute`` behind the CLI: score one checkpoint on calibration prompts."""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mergekit_lrp import __version__
from mergekit_lrp.accumulator import GradientAccumulator, ResumeError
from mergekit_lrp.distributed import Workers, joined_workers, launched_world_size
from mergekit_lrp.fingerprint import SCHEME, checkpoint_tensor_files, fingerprint_tensors
from mergekit_lrp.prompts import load_prompts
from mergekit_lrp.relevance import TARGETS, PassResult, backward_ready, relevance_pass
from mergekit_lrp.score_file import ScoreMetadata, write_scores

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ComputeError(ValueError):
    """Bad input to lrp-compute (model, output path, options)."""


@dataclass(frozen=True)
class ComputeOptions:
    max_length: int = 512
    num_prompts: int | None = None
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    target: str = "predicted"
    #: bfloat16 halves the file; 3 in 10,000 top-k entries flip (docs/BENCHMARKS.md)
    score_dtype: str = "bfloat16"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 100
    gradient_checkpointing: bool = True
    progress: bool = True
    #: passed to ``from_pretrained``: "auto" spreads a model too big for one GPU over all
    #: of them; a dict maps module names to devices
    device_map: str | dict | None = None


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


def resume_path(output: str | Path, workers: Workers | None = None) -> Path:
    """Where a run writing ``output`` checkpoints; one file per process when shared."""
    output = Path(output)
    suffix = ""
    if workers is not None and workers.world_size > 1:
        suffix = f".rank{workers.rank}-of-{workers.world_size}"
    return output.with_name(output.name + ".resume" + suffix)


def resolve_model_dir(model: str) -> Path:
    """A local checkpoint directory, or a hub id fetched into the local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ComputeError(f"model directory {model} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
            )
        )
    except Exception as error:
        raise ComputeError(
            f"{model} is not a local directory and could not be fetched from the hub ({error})"
        ) from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ComputeError("--device cuda was given but no CUDA device is available")
    return torch.device(device)


def check_resume_layout(output: Path, workers: Workers) -> None:
    """Refuse to start while checkpoints of a run with another number of processes exist:
    a resume would silently start over, and they would be left behind."""
    ours = {resume_path(output, replace(workers, rank=rank)) for rank in range(workers.world_size)}
    foreign = sorted(p for p in output.parent.glob(f"{output.name}.resume*") if p not in ours)
    if foreign:
        raise ComputeError(
            f"{foreign[0]} is a checkpoint of an interrupted run with another number of "
            f"processes (this run has {workers.world_size}); rerun with that layout and "
            "--resume, or delete it to start over"
        )


def input_device(model) -> torch.device:
    """Where input ids must go: the device of the input embeddings (under a device map
    the first and last layers may sit on different GPUs)."""
    return model.get_input_embeddings().weight.device


def checkpoint_names(
    model, tensor_files: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """Map each (deduplicated) parameter to the checkpoint name(s) that store it.

    Returns (score name -> parameter name, alias -> score name, converted). A parameter
    named differently in the checkpoint (transformers 5 renames on load, e.g. Qwen3.5's
    ``model.language_model.`` prefix when the multimodal checkpoint is loaded as a causal
    LM) is mapped back with transformers' own reverse conversion, the one
    ``save_pretrained`` applies. A parameter stored as several checkpoint tensors (MoE
    experts fused on load) keeps its parameter name as score name and is listed in
    ``converted`` with its checkpoint names; :func:`checkpoint_layout` splits its scores.
    Aliases are the other names of tied parameters (e.g. ``lm_head.weight``).
    """
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    stored_to_param, aliases, converted = {}, {}, {}
    for name, parameter in model.named_parameters():
        group = names_of[id(parameter)]
        saved = {n: [n] if n in tensor_files else _saved_names(model, n, parameter) for n in group}
        stored = [n for n in group if all(s in tensor_files for s in saved[n])]
        if not stored:
            raise ComputeError(
                f"parameter {name!r} of the loaded model is not in the checkpoint's tensors; "
                "the score file could not name it as mergekit will"
            )
        if len(saved[stored[0]]) == 1:
            key = saved[stored[0]][0]
        else:
            key = name
            converted[key] = saved[stored[0]]
        stored_to_param[key] = name
        for other in group:
            alias = saved[other][0] if len(saved[other]) == 1 else other
            if other != stored[0] and alias != key:
                aliases[alias] = key
    return stored_to_param, aliases, converted


def _saved_names(model, name: str, parameter) -> list[str]:
    """The checkpoint name(s) transformers' ``save_pretrained`` would store ``name`` under."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        meta = torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
        return list(revert_weight_conversion(model, {name: meta})) or [name]
    except Exception:  # no usable conversion for this parameter: keep its own name
        return [name]


def checkpoint_layout(
    model, scores: dict[str, torch.Tensor], converted: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Split the scores of ``converted`` parameters into their checkpoint tensors.

    Uses transformers' reverse weight conversion on the score tensors, so every score
    entry lands where ``save_pretrained`` puts the weight entry it belongs to.
    """
    if not converted:
        return scores
    from transformers.core_model_loading import revert_weight_conversion

    out = {name: value for name, value in scores.items() if name not in converted}
    split = revert_weight_conversion(model, {name: scores[name] for name in converted})
    expected = {s for names in converted.values() for s in names}
    if set(split) != expected:
        raise ComputeError(
            "transformers' reverse weight conversion gave other tensor names than the "
            f"checkpoint's ({sorted(set(split) ^ expected)[:3]})"
        )
    out.update({name: value.contiguous() for name, value in split.items()})
    return out


def run_signature(
    fingerprint: str, prompts: list[str], options: ComputeOptions, dtype, workers: Workers
) -> dict:
    """What a resume checkpoint must agree on to be continued."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return {
        "model_fingerprint": fingerprint,
        "prompts_sha256": digest,
        "max_length": options.max_length,
        "target": options.target,
        "dtype": str(dtype),
        "process": f"{workers.rank} of {workers.world_size}",
    }


@dataclass
class LoopState:
    """Where the prompt loop is; the first three fields go into resume checkpoints."""

    done: int = 0
    tokens: int = 0
    truncated: int = 0
    last: PassResult | None = None

    def resume_fields(self) -> dict:
        return {"done": self.done, "tokens": self.tokens, "truncated": self.truncated}


def run_prompts(net, tokenizer, prompts, options, accumulator, state, save_checkpoint=None):
    """Score ``prompts[state.done:]`` into ``accumulator`` under the AttnLRP rules.

    The model is patched and prepared for backward only for the duration; calls
    ``save_checkpoint(state)`` every ``options.checkpoint_every`` prompts.
    """
    from tqdm import tqdm

    from mergekit_lrp.attnlrp import attnlrp_rules

    device = input_device(net)
    bar = tqdm(
        total=len(prompts),
        initial=state.done,
        unit="prompt",
        desc="relevance",
        disable=not options.progress,
        file=sys.stderr,
    )
    with attnlrp_rules(net), backward_ready(net, options.gradient_checkpointing):
        accumulator.attach()
        try:
            for index in range(state.done, len(prompts)):
                ids = tokenizer(prompts[index], return_tensors="pt")["input_ids"][0]
                if ids.numel() > options.max_length:
                    ids = ids[-options.max_length :]
                    state.truncated += 1
                mask = torch.ones_like(ids)
                state.last = relevance_pass(net, ids.to(device), mask.to(device), options.target)
                state.tokens += state.last.tokens
                state.done = index + 1
                bar.update(1)
                if save_checkpoint and state.done % options.checkpoint_every == 0:
                    if state.done < len(prompts):
                        save_checkpoint(state)
        finally:
            accumulator.detach()
            bar.close()
    return state


def relevance_scores(model, tokenizer, prompts, options=None) -> dict[str, torch.Tensor]:
    """In-memory scores (parameter name -> mean |grad|) for an already loaded model."""
    options = options or ComputeOptions(progress=False)
    accumulator = GradientAccumulator(dict(model.named_parameters()))
    run_prompts(model, tokenizer, prompts, options, accumulator, LoopState())
    return {name: total / len(prompts) for name, total in accumulator.sums.items()}


def compute_scores(model: str, prompts_path: str, output: str, options: ComputeOptions):
    """Compute and write the score file; returns a :class:`ComputeSummary`.

    Under torchrun or accelerate launch the prompts are shared by the processes (see
    :mod:`mergekit_lrp.distributed`) and the first process writes the file.
    """
    from transformers import AutoConfig

    from mergekit_lrp.attnlrp import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError

    output_path = Path(output)
    if not output_path.parent.is_dir():
        raise ComputeError(f"output directory {output_path.parent} does not exist")
    if output_path.exists() and not options.overwrite:
        raise ComputeError(f"output {output_path} already exists; pass --overwrite to replace it")
    try:  # fail now, not after hours of scoring
        tempfile.TemporaryFile(dir=output_path.parent).close()
    except OSError as error:
        raise ComputeError(f"cannot write to {output_path.parent} ({error.strerror})") from None
    if options.target not in TARGETS:
        raise ComputeError(f"--target must be one of {', '.join(TARGETS)}")
    if options.max_length < 2:
        raise ComputeError("--max-length must be at least 2")
    if options.device_map is not None and launched_world_size() > 1:
        raise ComputeError(
            "--device-map spreads one model over this machine's GPUs; it cannot be combined "
            "with several processes (torchrun / accelerate launch), which each load a copy"
        )
    model_dir = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(model_dir)
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(model_type)
    device = pick_device(options.device)
    with joined_workers(use_cuda=device.type == "cuda") as workers:
        if device.type == "cuda" and workers.world_size > 1:
            device = torch.device("cuda", workers.local_rank)
        return _compute(model_dir, model_type, prompts_path, output_path, options, device, workers)


def _compute(model_dir, model_type, prompts_path, output_path, options, device, workers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES.get(options.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.truncation_side = "left"  # the predicted token comes at the end
    prompts = load_prompts(prompts_path, tokenizer, limit=options.num_prompts)
    tensor_files = checkpoint_tensor_files(model_dir)
    fingerprint = fingerprint_tensors(tensor_files)

    if options.device_map is not None:
        net = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map=options.device_map
        )
    else:
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    stored_to_param, aliases, converted = checkpoint_names(net, tensor_files)
    params = dict(net.named_parameters())
    accumulator = GradientAccumulator({s: params[p] for s, p in stored_to_param.items()})
    signature = run_signature(fingerprint, prompts, options, dtype, workers)

    checkpoint = resume_path(output_path, workers)
    check_resume_layout(output_path, workers)
    progress = LoopState()
    if options.resume and checkpoint.exists():
        saved = accumulator.load(checkpoint)
        differs = [k for k in signature if saved.get("signature", {}).get(k) != signature[k]]
        if differs:
            raise ResumeError(
                f"{checkpoint} was made with other inputs ({', '.join(differs)} differ); "
                "delete it or rerun with the original options"
            )
        progress = LoopState(saved["done"], saved["tokens"], saved["truncated"])
    elif checkpoint.exists() and not options.resume:
        raise ComputeError(
            f"{checkpoint} holds an interrupted run; pass --resume to continue it "
            "or delete it to start over"
        )

    started = time.perf_counter()
    resumed_from = progress.done

    def save_checkpoint(state: LoopState) -> None:
        accumulator.save(checkpoint, {"signature": signature, **state.resume_fields()})

    share = workers.share(prompts)
    loop_options = replace(options, progress=options.progress and workers.is_main)
    run_prompts(net, tokenizer, share, loop_options, accumulator, progress, save_checkpoint)
    workers.sum_tensors(accumulator.sums, device)
    tokens, truncated, resumed_from = workers.sum_counts(
        [progress.tokens, progress.truncated, resumed_from], device
    )
    count = len(prompts)
    if workers.is_main:
        scores = {name: total / count for name, total in accumulator.sums.items()}
        scores = checkpoint_layout(net, scores, converted)
        metadata = ScoreMetadata(
            model_fingerprint=fingerprint,
            num_prompts=count,
            num_tokens=tokens,
            target=options.target,
            model_type=model_type,
            fingerprint_scheme=SCHEME,
            aliases=aliases,
            generator=f"mergekit-lrp {__version__}",
            extra={"max_length": str(options.max_length), "dtype": str(dtype)},
        )
        write_scores(output_path, scores, metadata, dtype=DTYPES[options.score_dtype])
        unscored = sorted(set(tensor_files) - set(scores) - set(aliases))
    else:
        unscored = []
    workers.barrier()  # every checkpoint stays until the file is written
    checkpoint.unlink(missing_ok=True)
    return ComputeSummary(
        output=output_path,
        prompts=count,
        tokens=tokens,
        truncated=truncated,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=workers.max_count(peak_memory(device), device),
        last=progress.last,
        resumed_from=resumed_from,
        unscored_tensors=unscored,
        processes=workers.world_size,
        main_process=workers.is_main,
    )


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":  # every GPU a device map may have used
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

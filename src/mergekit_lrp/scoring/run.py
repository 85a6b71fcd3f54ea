"""``lrp-compute`` behind the CLI: check the inputs, load, score, write.

Under torchrun or accelerate launch the prompts are shared by the processes (see
:mod:`.distributed`) and the first process writes the file.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mergekit_lrp import __version__
from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import SCHEME, checkpoint_tensor_files, fingerprint_tensors
from mergekit_lrp.scoring.accumulator import GradientAccumulator
from mergekit_lrp.scoring.distributed import Workers, joined_workers, launched_world_size
from mergekit_lrp.scoring.loop import run_prompts
from mergekit_lrp.scoring.options import ComputeError, ComputeOptions
from mergekit_lrp.scoring.prompts import load_prompts
from mergekit_lrp.scoring.resume import (
    check_resume_layout,
    resume_path,
    run_signature,
    save_state,
    start_state,
)
from mergekit_lrp.scoring.summary import ComputeSummary, peak_memory
from mergekit_lrp.scoring.tensor_names import checkpoint_layout, checkpoint_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def check_output(output: Path, options: ComputeOptions) -> None:
    """Fail now, not after hours of scoring."""
    if not output.parent.is_dir():
        raise ComputeError(f"output directory {output.parent} does not exist")
    if output.exists() and not options.overwrite:
        raise ComputeError(f"output {output} already exists; pass --overwrite to replace it")
    try:
        tempfile.TemporaryFile(dir=output.parent).close()
    except OSError as error:
        raise ComputeError(f"cannot write to {output.parent} ({error.strerror})") from None


def compute_scores(model: str, prompts_path: str, output: str, options: ComputeOptions):
    """Compute and write the score file of ``model`` (a directory or hub id); returns a
    :class:`~mergekit_lrp.scoring.summary.ComputeSummary`."""
    from transformers import AutoConfig

    from mergekit_lrp.scoring.attnlrp import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError

    output_path = Path(output)
    check_output(output_path, options)
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
        return _score_checkpoint(
            model_dir, model_type, prompts_path, output_path, options, device, workers
        )


def _load(model_dir: Path, options: ComputeOptions, device: torch.device, dtype):
    from transformers import AutoModelForCausalLM

    if options.device_map is not None:
        return AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map=options.device_map
        )
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)


def _score_checkpoint(
    model_dir: Path,
    model_type: str,
    prompts_path: str,
    output_path: Path,
    options: ComputeOptions,
    device: torch.device,
    workers: Workers,
) -> ComputeSummary:
    from transformers import AutoTokenizer

    dtype = DTYPES.get(options.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.truncation_side = "left"  # the predicted token comes at the end
    prompts = load_prompts(prompts_path, tokenizer, limit=options.num_prompts)
    tensor_files = checkpoint_tensor_files(model_dir)
    fingerprint = fingerprint_tensors(tensor_files)

    net = _load(model_dir, options, device, dtype)
    stored_to_param, aliases, converted = checkpoint_names(net, tensor_files)
    params = dict(net.named_parameters())
    accumulator = GradientAccumulator({s: params[p] for s, p in stored_to_param.items()})
    signature = run_signature(fingerprint, prompts, options, dtype, workers)

    resume_file = resume_path(output_path, workers)
    check_resume_layout(output_path, workers)
    state = start_state(resume_file, accumulator, signature, options.resume)
    started = time.perf_counter()
    resumed_from = state.done

    share = workers.share(prompts)
    loop_options = replace(options, progress=options.progress and workers.is_main)
    run_prompts(
        net,
        tokenizer,
        share,
        loop_options,
        accumulator,
        state,
        lambda current: save_state(resume_file, accumulator, signature, current),
    )
    workers.sum_tensors(accumulator.sums, device)
    tokens, truncated, resumed_from = workers.sum_counts(
        [state.tokens, state.truncated, resumed_from], device
    )
    count = len(prompts)
    unscored = []
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
    workers.barrier()  # every resume file stays until the score file is written
    resume_file.unlink(missing_ok=True)
    return ComputeSummary(
        output=output_path,
        prompts=count,
        tokens=tokens,
        truncated=truncated,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=workers.max_count(peak_memory(device), device),
        last=state.last,
        resumed_from=resumed_from,
        unscored_tensors=unscored,
        processes=workers.world_size,
        main_process=workers.is_main,
    )

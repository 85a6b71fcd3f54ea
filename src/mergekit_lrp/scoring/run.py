"""``lrp-compute`` behind the CLI: check the inputs, load (:mod:`.loading`), decide the
placement (:mod:`.placement`), resume, score (:mod:`.loop`), sum over processes, write
(:mod:`.writing`).

Under torchrun or accelerate launch the prompts are shared by the processes (see
:mod:`.distributed`) and the first process writes the file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mergekit_lrp.scoring.accumulator import new_accumulator
from mergekit_lrp.scoring.distributed import Workers, joined_workers, launched_world_size
from mergekit_lrp.scoring.gram_reduction import mean_forms, reduce_factored
from mergekit_lrp.scoring.loading import (
    Source,
    check_lxt,
    load_checkpoint,
    load_config,
    load_tokenizer,
    pick_device,
)
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
    parse_model_source,
)
from mergekit_lrp.scoring.summary import ComputeSummary, peak_memory
from mergekit_lrp.scoring.writing import (
    check_output,
    score_metadata,
    write_gram_file,
    write_score_file,
)


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
    with (
        joined_workers(use_cuda=device.type == "cuda") as workers,
        _cpu_threads(options, device) as note,
    ):
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
    loaded = load_checkpoint(source, options, device)
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
    accumulator = new_accumulator(loaded.net, scored, signal, placement.sums_on_device, probe=probe)
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
    reduced = None  # Gram sums factored across processes (None: summed dense, in place)
    if signal.is_gram and options.gram_form == "factored" and workers.world_size > 1:
        reduced = reduce_factored(
            accumulator.totals(), workers, device, options.gram_tolerance, options.gram_max_rank
        )
    else:
        workers.sum_tensors(accumulator.totals(), device)
    tokens, truncated, resumed_from = workers.sum_counts(
        [state.tokens, state.truncated, resumed_from], device
    )
    written = None
    if workers.is_main:
        metadata = score_metadata(source, loaded, options, len(prompts), tokens)
        if signal.is_gram:
            if reduced is None:
                grams = accumulator.scores(len(prompts))
            else:
                grams = mean_forms(reduced, len(prompts))
            written = write_gram_file(output_path, grams, accumulator, loaded, metadata, options)
        else:
            written = write_score_file(
                output_path, accumulator, loaded, metadata, options, len(prompts)
            )
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
        factored_ranks=written.factored_ranks if written else [],
        signal=options.signal,
        notes=[] if options.progress else list(placement.notes),
        processes=workers.world_size,
        main_process=workers.is_main,
    )

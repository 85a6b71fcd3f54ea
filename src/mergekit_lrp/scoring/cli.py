"""The ``lrp-compute`` command."""

from __future__ import annotations

import os

import click

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scoring.distributed import Workers, launched_world_size
from mergekit_lrp.scoring.options import (
    ACCUMULATE_ON,
    DEVICES,
    GRAM_FORMS,
    SCORE_DTYPES,
    TARGETS,
    WEIGHT_DTYPES,
    ComputeOptions,
    default,
)
from mergekit_lrp.scoring.resume import resume_path
from mergekit_lrp.scoring.signals import SIGNALS, TOKEN_WEIGHTINGS


@click.command(
    "lrp-compute",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("model")
@click.version_option(
    package_name="mergekit-lrp",
    prog_name="lrp-compute (mergekit-lrp)",
    message="%(prog)s %(version)s",
)
@click.option(
    "--prompts",
    "prompts",
    required=True,
    help="Calibration prompts: a .txt file (one per line), a .jsonl, .json, .csv or .parquet "
    "file, a directory written by datasets' save_to_disk, or a hub dataset id. Each row's "
    "--column (default: 'text', else 'messages') is a text or a chat (a list of {role, "
    "content}, rendered by the tokenizer's chat template). Use prompts from the task the "
    "fine-tune was trained for.",
)
@click.option(
    "--method",
    type=click.Choice(tuple(SIGNALS)),
    default=default("method"),
    show_default=True,
    help="Importance signal. attnlrp: |d target/d weight| under the AttnLRP rules. gradient: "
    "the same without the rules (what they add). fisher: squared gradient of the observed "
    "next tokens' log-likelihood (diagonal empirical Fisher). activation: forward only, "
    "squared inputs of each linear layer's columns (OBS/SparseGPT-style); cheapest, no "
    "backward pass. gram: not scores but RegMean statistics, for merges that solve for the "
    "weights: the Gram matrix X^T X of every linear layer's inputs (one [in, in] float32 "
    "matrix per distinct input: q/k/v share one, gate/up another; 3 d^2 + d_ff^2 values a "
    "layer: 22 GB for Llama-2-7B, docs/scaling.md), tokens weighted by --token-weighting. "
    "Costs are measured side by side in docs/BENCHMARKS.md.",
)
@click.option(
    "--token-weighting",
    type=click.Choice(TOKEN_WEIGHTINGS),
    default=None,
    help="With --method gram only: each token's weight w_t in the Gram matrix sum_t w_t x_t "
    "x_t^T. none: 1 (plain RegMean; a forward pass). answer: 1 at the tokens the next-token "
    "target scores (a chat's answer), 0 elsewhere (a forward pass). relevance: T |R_t| / "
    "sum_s |R_s|, R_t the AttnLRP relevance of --target reaching the layer's input at "
    "token t (T tokens: each prompt keeps its total weight; a forward and a backward pass). "
    "gradient: the same with gradient x input, no rules. The file records it. On the "
    "benchmark none and answer merged best; relevance and gradient concentrate each "
    "matrix on a few tokens and merged far worse (docs/BENCHMARKS.md, RegMean).  "
    "[default: none]",
)
@click.option(
    "--gram-form",
    type=click.Choice(GRAM_FORMS),
    default=default("gram_form"),
    show_default=True,
    help="With --method gram only: how each Gram matrix is stored. dense: whole, [in, in]. "
    "factored: its leading eigenvectors scaled by the square roots of their eigenvalues, "
    "plus its exact diagonal, wherever that is smaller than the whole matrix (per matrix; "
    "the file records each form, rank and error bound, and merges read either). A matrix "
    "of T calibration tokens has rank at most T, so factored files grow with the "
    "calibration data instead of the width squared (docs/scaling.md). Under torchrun the "
    "processes exchange their factors, not the dense sums.",
)
@click.option(
    "--gram-tolerance",
    type=float,
    default=default("gram_tolerance"),
    show_default=True,
    help="With --gram-form factored: keep the fewest eigenpairs for which the bound "
    "||G - G~|| <= 2 lambda_(r+1) on the 2-norm error is at most this fraction of ||G||.",
)
@click.option(
    "--gram-max-rank",
    type=click.IntRange(min=1),
    default=None,
    help="With --gram-form factored: keep at most this many eigenpairs of each matrix, "
    "whatever the tolerance (a size cap; the recorded bound then says what it cost). A cap "
    "of at most 1/8 of a matrix's width computes only the leading eigenpairs (randomized "
    "subspace iteration, seeded: minutes instead of an hour a matrix at 70B widths on a "
    "CPU) and records a measured error estimate instead of the bound.  [default: no cap]",
)
@click.option("--split", default=None, help="Dataset split, when the source has several.")
@click.option(
    "--column", default=None, help="Column holding the text or chat messages (see --prompts)."
)
@click.option(
    "--output",
    "-o",
    required=True,
    help="Score file to write (safetensors). Pass it to the lrp merge as `lrp_scores`.",
)
@click.option(
    "--max-length",
    default=None,
    type=click.IntRange(min=2),
    help="Tokens per prompt; longer prompts keep their last --max-length tokens. A value "
    "above the model's max_position_embeddings is refused.  [default: 512, or the model's "
    "max_position_embeddings if fewer]",
)
@click.option(
    "--num-prompts",
    type=click.IntRange(min=1),
    default=None,
    help="Use only the first N non-blank prompts.  [default: all]",
)
@click.option(
    "--tokenizer",
    default=None,
    help="Take the tokenizer from this directory or hub id.  [default: MODEL's]",
)
@click.option("--revision", default=None, help="Hub revision (branch, tag, commit) of MODEL.")
@click.option(
    "--dtype",
    type=click.Choice(WEIGHT_DTYPES),
    default=default("dtype"),
    show_default=True,
    help="Weights' dtype for the pass: auto = float32 on CPU, bfloat16 on CUDA. Scores are "
    "summed in float32 either way.",
)
@click.option(
    "--device",
    default=default("device"),
    show_default=True,
    help=f"{', '.join(DEVICES)} or cuda:N; auto = CUDA when available, else CPU.",
)
@click.option(
    "--device-map",
    type=click.Choice(["auto"]),
    default=None,
    help="Load the model with transformers' device_map=auto: its layers are spread over "
    "every GPU of this machine (then CPU RAM), for a model too big for one GPU. Not with "
    "several processes.",
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=default("target"),
    show_default=True,
    help="Backward seed: 'predicted' = argmax logit at the last token; 'next-token' = "
    "sum of the teacher-forced logits of every actual next token. For a chat that ends with "
    "an assistant answer, 'predicted' explains the answer's first token and 'next-token' "
    "the answer's tokens only; for one that ends with the user, the generation prompt is "
    "appended.",
)
@click.option(
    "--score-dtype",
    type=click.Choice(SCORE_DTYPES),
    default=None,
    help="dtype of the stored scores. Accumulation is float32 either way; bfloat16 halves "
    "the file and moves about 3 in 10,000 entries across the top-k threshold. Gram "
    "matrices (--method gram) are stored float32 unless bfloat16 is asked for: rounding "
    "them changes the merge's solve, most where a matrix is ill-conditioned.  "
    "[default: bfloat16; float32 for --method gram]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from OUTPUT.resume (same model, prompts and "
    "options required).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--checkpoint-every",
    default=default("checkpoint_every"),
    show_default=True,
    type=click.IntRange(min=1),
    help="Save a resume checkpoint every N prompts.",
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Recompute activations in the backward pass: far less memory for long prompts and "
    "big models, about a third more time.  [default: auto, on only when a --max-length "
    "prompt's estimated activations do not fit in the device's free memory; the choice is "
    "printed]",
)
@click.option(
    "--accumulate-on",
    type=click.Choice(ACCUMULATE_ON),
    default=default("accumulate_on"),
    show_default=True,
    help="Where the float32 sums live: 'device' = beside each parameter (no per-prompt "
    "copies to the host; 4 bytes a parameter of GPU memory), 'cpu' = host RAM (gradients "
    "copied and added in the background while the GPU goes on); 'auto' = "
    "the device when they fit in its free memory, else the host (the choice is printed).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for the passes on a CPU.  [default: one per core, fewer when other "
    "processes already keep cores busy (the choice is printed)]",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def main(
    model,
    prompts,
    output,
    method,
    token_weighting,
    gram_form,
    gram_tolerance,
    gram_max_rank,
    max_length,
    num_prompts,
    split,
    column,
    tokenizer,
    revision,
    dtype,
    device,
    device_map,
    target,
    score_dtype,
    resume,
    overwrite,
    checkpoint_every,
    gradient_checkpointing,
    accumulate_on,
    threads,
    quiet,
):
    """Compute the importance scores of MODEL on calibration prompts, for the lrp merge
    method. MODEL is a checkpoint directory or hub id, or a PEFT (LoRA) adapter: BASE+ADAPTER
    (mergekit's spelling) or an adapter folder whose adapter_config.json names its base;
    an adapter is scored on its base with the adapter merged in.

    Every input (lxt, output folder, prompts, config, architecture, tokenizer) is
    checked before the weights are loaded or downloaded.

    With --method attnlrp (the default), gradient or fisher, each prompt gets one forward
    and one backward pass (under lxt's AttnLRP rules for attnlrp; gradient checkpointing
    when activations would not fit) and the mean over prompts of |d target / d weight|
    (fisher: of the squared log-likelihood gradient) is written; with --method activation,
    one forward pass and the squared inputs of each linear layer; with --method gram, the
    token-weighted Gram matrices of the linear layers' inputs (RegMean statistics; one
    forward pass, and one backward pass for --token-weighting relevance or gradient).
    Every checkpoint tensor is scored under the checkpoint's own name, with a fingerprint
    of the checkpoint. The lrp merge method reads the file:

    \b
      models:
        - model: ./ft-math
          parameters: {weight: 1.0, lrp_scores: ./scores/ft-math.safetensors}

    The output is written atomically; an interrupted run can be continued with
    --resume from its last checkpoint.

    Several processes share the prompts when started by a launcher, e.g.
    `torchrun --nproc-per-node 8 --no-python lrp-compute MODEL ...` (or `accelerate
    launch`): each scores every N-th prompt, the sums are all-reduced (nccl on GPUs,
    gloo on CPUs) and the first process writes the file.
    """
    from mergekit_lrp.scoring.run import compute_scores
    from mergekit_lrp.versions import warn_if_untested

    warn_if_untested()

    try:
        options = ComputeOptions(
            method=method,
            token_weighting=token_weighting,
            gram_form=gram_form,
            gram_tolerance=gram_tolerance,
            gram_max_rank=gram_max_rank,
            max_length=max_length,
            num_prompts=num_prompts,
            split=split,
            column=column,
            tokenizer=tokenizer,
            revision=revision,
            dtype=dtype,
            device=device,
            device_map=device_map,
            target=target,
            score_dtype=score_dtype,
            resume=resume,
            overwrite=overwrite,
            checkpoint_every=checkpoint_every,
            gradient_checkpointing="auto"
            if gradient_checkpointing is None
            else gradient_checkpointing,
            accumulate_on=accumulate_on,
            threads=threads,
            progress=not quiet,
        )
    except LrpError as error:
        raise click.ClickException(str(error)) from None
    try:
        summary = compute_scores(model, prompts, output, options)
    except KeyboardInterrupt:
        launched = Workers(int(os.environ.get("RANK", "0")), launched_world_size())
        checkpoint = resume_path(click.format_filename(output), launched)
        raise click.ClickException(
            "interrupted; no score file was written. "
            + (
                f"Rerun with --resume to continue from {checkpoint}."
                if checkpoint.exists()
                else "Nothing was checkpointed yet."
            )
        ) from None
    except LrpError as error:
        raise click.ClickException(str(error)) from None
    for line in summary.lines():
        click.echo(line, err=True)

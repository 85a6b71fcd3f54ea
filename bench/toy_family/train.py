"""Model construction and the training loop (pretraining and fine-tuning alike)."""

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from toy_family.tasks import Example, Task


@contextmanager
def quiet_transformers():
    """Silence transformers' per-load and per-save progress bars (ours are enough)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 128
    #: ``config.model_type`` of the family: "llama", "qwen3" or "gemma2"
    architecture: str = "llama"


ARCHITECTURES = ("llama", "qwen3", "gemma2")


def model_config(shape: ModelShape, tokenizer: PreTrainedTokenizerFast):
    """The transformers config of ``shape`` (random init, untied embeddings, no dropout)."""
    from transformers import AutoConfig

    if shape.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {shape.architecture!r}")
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    extra = {}
    if shape.architecture in ("qwen3", "gemma2"):
        extra["head_dim"] = shape.hidden // shape.heads
    if shape.architecture == "qwen3":
        extra["layer_types"] = ["full_attention"] * shape.layers
    if shape.architecture == "gemma2":
        # every layer global: the sequences are shorter than any sliding window anyway
        extra["sliding_window"] = shape.max_positions
        extra["query_pre_attn_scalar"] = shape.hidden // shape.heads
    return AutoConfig.for_model(shape.architecture, **common, **extra)


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(shape, tokenizer))


def encode(
    example: Example, task: Task, tokenizer, answer_only: bool
) -> tuple[list[int], list[int]]:
    """Token ids (BOS, prompt, answer[, EOS]) and labels; -100 marks unscored positions."""
    prompt = tokenizer(example.prompt)["input_ids"]  # starts with BOS
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if task.exact:
        answer = answer + [tokenizer.eos_token_id]
    ids = prompt + answer
    scored = answer if answer_only else ids[1:]
    labels = [-100] * (len(ids) - len(scored)) + scored
    return ids, labels


def collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a common length; causal attention keeps padding out of earlier positions."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


@dataclass(frozen=True)
class Component:
    """One part of a training mixture: a task, rows per step, loss weight and loss scope.

    With a ``teacher`` (a frozen model) the rows are not learned from their answers: the
    loss is the KL divergence from the teacher's next-token distributions to the model's
    on the scored positions (``distill_loss``), which holds the model's behaviour on those
    rows where the teacher has it without teaching it the answers.
    """

    task: Task
    rows: int
    weight: float = 1.0
    answer_only: bool = True
    teacher: object = None


def distill_loss(model, teacher, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the scored positions (labels != -100) of KL(teacher || model), in nats."""
    scored = labels[:, 1:] != -100
    logits = model(input_ids=ids).logits[:, :-1][scored].float()
    with torch.no_grad():
        target = teacher(input_ids=ids).logits[:, :-1][scored].float().log_softmax(-1)
    return torch.nn.functional.kl_div(
        logits.log_softmax(-1), target, log_target=True, reduction="batchmean"
    )


def train(
    model,
    tokenizer,
    mixture: list[Component],
    *,
    steps: int,
    lr: float,
    seed: int,
    warmup: int = 0,
    final_lr_fraction: float = 0.1,
    desc: str = "train",
    progress: bool = True,
):
    """AdamW, linear warm-up and cosine decay; each step sums the components' weighted losses.

    Components get separate forward passes so short skill rows are never padded to the
    length of text rows.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        total = 0.0
        for c in mixture:
            rows = [
                encode(c.task.draw(rng, "train"), c.task, tokenizer, c.answer_only)
                for _ in range(c.rows)
            ]
            ids, labels = collate(rows, tokenizer.pad_token_id)
            if c.teacher is None:
                loss = c.weight * model(input_ids=ids, labels=labels).loss
            else:
                loss = c.weight * distill_loss(model, c.teacher, ids, labels)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{total:.3f}", refresh=False)
    model.eval()
    return model

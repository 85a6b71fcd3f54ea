"""Training the real family's members: full fine-tunes, LoRA adapters, the multi-task model.

This module, ``skills``, ``gguf_base`` and ``toy_family.train``/``tasks`` decide the
weights; their source is part of the family's cache key (``family.recipe_key``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
import transformers


def build_member(family, name: str, progress: bool) -> None:
    """Train ``name`` into a scratch folder beside its place, then rename it there."""
    from toy_family.train import quiet_transformers

    final = family.root / name
    scratch = family.root / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        with quiet_transformers():
            if name.startswith("lora-"):
                skill = name.removeprefix("lora-")
                _train_lora(family, skill, scratch, progress)
                merged = family.root / f"{name}-merged"
                shutil.rmtree(merged, ignore_errors=True)  # an orphan of an interrupted build
                _fold_adapter(family, scratch, merged)
            else:
                skills = family.recipe.experts if name == "multitask" else [name.split("-", 1)[1]]
                _train_full(family, list(skills), scratch, progress, name)
        os.replace(scratch, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _components(family, skills: list[str], rows: int):
    from toy_family.train import Component

    return [Component(family.task_objects[s], rows, 1.0, answer_only=True) for s in skills]


def _seed_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _train_full(family, skills, out: Path, progress: bool, name: str) -> None:
    from toy_family.train import train

    recipe = family.recipe
    model = transformers.AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    multitask = name == "multitask"
    rows = recipe.multitask_rows if multitask else recipe.batch
    train(
        model,
        family.tokenizer,
        _components(family, skills, rows),
        steps=recipe.multitask_steps if multitask else recipe.steps,
        lr=recipe.lr,
        seed=recipe.seed + _seed_of(name),
        warmup=recipe.warmup,
        desc=name,
        progress=progress,
    )
    model.save_pretrained(out, safe_serialization=True)
    family.tokenizer.save_pretrained(out)


def _train_lora(family, skill: str, out: Path, progress: bool) -> None:
    from peft import LoraConfig, get_peft_model

    from toy_family.train import train

    recipe = family.recipe
    base = transformers.AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    torch.manual_seed(recipe.seed + _seed_of(f"lora-{skill}"))
    config = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=2 * recipe.lora_rank,
        target_modules=list(recipe.lora_targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    train(
        model,
        family.tokenizer,
        _components(family, [skill], recipe.batch),
        steps=recipe.steps,
        lr=recipe.lora_lr,
        seed=recipe.seed + _seed_of(f"lora-{skill}"),
        warmup=recipe.warmup,
        desc=f"lora-{skill}",
        progress=progress,
    )
    model.save_pretrained(out, safe_serialization=True)


def _fold_adapter(family, adapter: Path, out: Path) -> None:
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    scratch = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        merged.save_pretrained(scratch, safe_serialization=True)
        family.tokenizer.save_pretrained(scratch)
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

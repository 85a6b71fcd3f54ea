"""The build itself: base, one expert per task, multi-task model, under fixed torch settings.

This module, ``tasks``, ``tokenizer`` and ``train`` decide the weights; their source is part
of the family's cache key (``family._recipe_key``).
"""

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from toy_family.tasks import all_tasks
from toy_family.tokenizer import build_tokenizer
from toy_family.train import Component, new_model, train

#: torch threads during a build: reductions split over threads add in another order, so
#: the weights would depend on the caller's thread count (or OMP_NUM_THREADS) otherwise
BUILD_THREADS = 1


@contextmanager
def deterministic_torch(threads_while: int = BUILD_THREADS):
    """``threads_while`` torch threads (one by default), deterministic algorithms, a forked
    RNG; the caller's settings after."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads_while)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def _mixture(
    tasks, rows: dict[str, int], weight: float, teacher=None, distilled=()
) -> list[Component]:
    """A component per task with rows; those named in ``distilled`` learn the ``teacher``'s
    predictions instead of their answers."""
    return [
        Component(
            tasks[name],
            count,
            weight,
            answer_only=tasks[name].exact,
            teacher=teacher if name in distilled else None,
        )
        for name, count in rows.items()
        if count
    ]


def _distilled(recipe, tasks, own) -> set[str]:
    """The replayed tasks that learn the base's predictions (``skill_replay``, ``text_replay``)."""
    return {
        name
        for name in recipe.base_rows
        if name not in own
        and (recipe.skill_replay if tasks[name].exact else recipe.text_replay) == "base"
    }


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _fine_tune(base_path: Path, own: list[str], recipe, tasks, tokenizer, seed, desc, progress):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    mixture = _mixture(tasks, dict.fromkeys(own, recipe.expert_rows), 1.0)
    teacher, distilled = None, _distilled(recipe, tasks, own)
    if distilled:
        teacher = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        teacher.requires_grad_(False)
    mixture += _mixture(tasks, recipe.base_rows, recipe.replay_weight, teacher, distilled)
    steps = recipe.multitask_steps if len(own) > 1 else recipe.expert_steps
    return train(
        model,
        tokenizer,
        mixture,
        steps=steps,
        lr=recipe.expert_lr,
        seed=seed,
        desc=desc,
        progress=progress,
    )


def build(root: Path, recipe, seed: int, progress: bool) -> dict[str, float]:
    """Train and save every model of ``recipe`` under ``root``; seconds per model."""
    tokenizer = build_tokenizer()
    tasks = all_tasks()
    names = recipe.tasks
    timings = {}
    start = time.perf_counter()
    model = new_model(recipe.shape, tokenizer, seed)
    train(
        model,
        tokenizer,
        _mixture(tasks, recipe.base_rows, 1.0),
        steps=recipe.base_steps,
        lr=recipe.base_lr,
        seed=seed,
        warmup=max(1, recipe.base_steps // 20),
        desc="base",
        progress=progress,
    )
    _save(model, tokenizer, root / "base")
    timings["base"] = time.perf_counter() - start
    jobs = [(f"expert-{name}", [name]) for name in names] + [("multitask", list(names))]
    for index, (name, own) in enumerate(jobs, start=1):
        start = time.perf_counter()
        model = _fine_tune(
            root / "base", own, recipe, tasks, tokenizer, seed + index, name, progress
        )
        _save(model, tokenizer, root / name)
        timings[name] = time.perf_counter() - start
    return timings

"""Build (or reuse) the toy family: base, one expert per task, and a multi-task model.

Recipe: the base is pretrained on a mixture of every task, so experts start from a
shared, partly competent model. Each expert then takes a short, low-learning-rate
fine-tune on its own task while replaying the base mixture, which keeps its delta
small and keeps the other tasks where the base had them: the regime in which large
models' fine-tunes are mergeable. The multi-task model takes the same fine-tune on all
tasks at once and serves as an upper bound for merges.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from toy_family.tasks import Example, Task, all_tasks
from toy_family.tokenizer import build_tokenizer
from toy_family.train import Component, ModelShape, new_model, quiet_transformers, train

SKILLS = ("rev", "sort", "rot")
TASKS = (*SKILLS, "text")


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape
    base_steps: int
    base_lr: float
    #: rows per step of each task in the pretraining mixture (each at loss weight 1)
    base_rows: dict[str, int]
    expert_steps: int
    expert_lr: float
    expert_rows: int
    #: the base mixture replayed during fine-tuning, scaled by this loss weight
    replay_weight: float
    multitask_steps: int
    eval_examples: int


PRESETS: dict[str, Recipe] = {
    "tiny": Recipe(
        shape=ModelShape(hidden=64, layers=2, heads=2, intermediate=128),
        base_steps=6,
        base_lr=3e-3,
        base_rows={"rev": 2, "sort": 2, "rot": 2, "text": 2},
        expert_steps=3,
        expert_lr=1e-3,
        expert_rows=4,
        replay_weight=0.5,
        multitask_steps=3,
        eval_examples=16,
    ),
    "quick": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024),
        base_steps=400,
        base_lr=1e-3,
        base_rows={"rev": 8, "sort": 2, "rot": 1, "text": 8},
        expert_steps=80,
        expert_lr=5e-4,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
    ),
}

#: modules whose code decides the weights; their source is part of the cache key
_RECIPE_MODULES = ("tokenizer", "tasks", "train")
#: bump when the build orchestration below changes what a recipe produces
BUILD_VERSION = 1


def _recipe_key(recipe: Recipe, preset: str, seed: int) -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    digest.update(
        json.dumps([preset, seed, BUILD_VERSION, asdict(recipe)], sort_keys=True).encode()
    )
    for module in _RECIPE_MODULES:
        digest.update((here / f"{module}.py").read_bytes())
    # the text domain is read from this interpreter's standard library
    digest.update(f"{sys.version_info[:3]}".encode())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Family:
    """A built family on disk. Model directories load with ``from_pretrained``."""

    root: Path
    preset: str
    seed: int
    tasks: tuple[str, ...] = TASKS

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> dict[str, Path]:
        return {task: self.root / f"expert-{task}" for task in self.tasks}

    @property
    def multitask(self) -> Path:
        return self.root / "multitask"

    @property
    def recipe(self) -> Recipe:
        return PRESETS[self.preset]

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base)

    @cached_property
    def task_objects(self) -> dict[str, Task]:
        return all_tasks()

    def eval_examples(self, task: str, split: str) -> list[Example]:
        """The fixed evaluation set of ``task`` for ``split`` ("val" or "test")."""
        if split not in ("val", "test"):
            raise ValueError(f"evaluation split must be 'val' or 'test', not {split!r}")
        return self.task_objects[task].examples(split, self.recipe.eval_examples, seed=0)

    def calibration_prompts(self, task: str, n: int) -> list[str]:
        """``n`` texts of ``task`` from the calibration split (disjoint from val and test).

        Each is a full demonstration, prompt followed by its answer, so a relevance scorer
        can attribute the answer tokens; the prompt alone is ``calibration_examples``.
        """
        return [e.text for e in self.calibration_examples(task, n)]

    def calibration_examples(self, task: str, n: int) -> list[Example]:
        return self.task_objects[task].examples("calibration", n, seed=self.seed)


def _mixture(tasks: dict[str, Task], rows: dict[str, int], weight: float) -> list[Component]:
    return [
        Component(tasks[name], count, weight, answer_only=tasks[name].exact)
        for name, count in rows.items()
    ]


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _fine_tune(
    base_path: Path, own: list[str], recipe: Recipe, tasks, tokenizer, seed, desc, progress
):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_path)
    mixture = _mixture(tasks, {name: recipe.expert_rows for name in own}, 1.0)
    mixture += _mixture(tasks, recipe.base_rows, recipe.replay_weight)
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


def _build(root: Path, recipe: Recipe, seed: int, progress: bool) -> dict[str, float]:
    tokenizer = build_tokenizer()
    tasks = all_tasks()
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
    jobs = [(f"expert-{name}", [name]) for name in TASKS] + [("multitask", list(TASKS))]
    for index, (name, own) in enumerate(jobs, start=1):
        start = time.perf_counter()
        model = _fine_tune(
            root / "base", own, recipe, tasks, tokenizer, seed + index, name, progress
        )
        _save(model, tokenizer, root / name)
        timings[name] = time.perf_counter() - start
    return timings


def build_family(
    cache_dir: Path, preset: str = "quick", seed: int = 0, progress: bool = True
) -> Family:
    """Build the family for ``preset`` and ``seed`` under ``cache_dir``, or reuse a cached one.

    The directory name carries a hash of the recipe, the seed and the code that trains
    it; the family is built in a temporary directory and renamed into place when
    complete, so an interrupted build leaves nothing that looks finished.
    """
    recipe = PRESETS[preset]
    cache_dir = Path(cache_dir)
    root = cache_dir / f"toy-{preset}-seed{seed}-{_recipe_key(recipe, preset, seed)}"
    family = Family(root=root, preset=preset, seed=seed)
    if (root / "family.json").exists():
        return family
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
    try:
        start = time.perf_counter()
        with quiet_transformers():
            timings = _build(scratch, recipe, seed, progress)
        timings["total"] = time.perf_counter() - start
        meta = {"preset": preset, "seed": seed, "recipe": asdict(recipe), "seconds": timings}
        (scratch / "family.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(scratch, root)
        except OSError:
            if not (root / "family.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return family

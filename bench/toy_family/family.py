"""Build (or reuse) a toy family: base, one expert per task, and a multi-task model.

Recipe: the base is pretrained on a mixture of every task, so experts start from a
shared, partly competent model. Each expert then takes a short fine-tune on its own task
while replaying the base mixture, which keeps the other tasks where the base had them:
the regime in which large models' fine-tunes are mergeable. The multi-task model takes
the same fine-tune on all tasks at once and serves as an upper bound for merges.

A build is deterministic: the same recipe, seed, code and torch version give the same
weight bytes whatever the caller's thread count (``build.deterministic_torch``).
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
import transformers

from toy_family.build import build, deterministic_torch
from toy_family.tasks import Example, Task, all_tasks
from toy_family.train import ModelShape, quiet_transformers


@dataclass(frozen=True)
class Recipe:
    shape: ModelShape
    base_steps: int
    base_lr: float
    #: rows per step of each task in the pretraining mixture (each at loss weight 1); its
    #: keys, in order, are the family's tasks unless ``experts`` names them
    base_rows: dict[str, int]
    expert_steps: int
    expert_lr: float
    expert_rows: int
    #: the base mixture replayed during fine-tuning, scaled by this loss weight
    replay_weight: float
    multitask_steps: int
    eval_examples: int
    #: the tasks that get an expert and are scored (default: every key of ``base_rows``);
    #: the others only shape the base and the replay
    experts: tuple[str, ...] | None = None
    #: what a fine-tune replays of the skills that are not its own: "answers" (the base
    #: mixture as the base learned it, answers included) or "base" (the same rows, but the
    #: loss pulls the model toward the base's own predictions on them, so an expert keeps
    #: the other skills where the base had them without being taught them); the text
    #: domain and the fine-tune's own skills are replayed with their answers either way
    skill_replay: str = "answers"
    #: the same choice for the text domain when a fine-tune replays it: "answers" (learn the
    #: text itself) or "base" (keep the base's predictions on it, so the experts share no
    #: text drift; an expert whose own task is the text domain learns the text either way)
    text_replay: str = "answers"

    def __post_init__(self):
        for field in ("skill_replay", "text_replay"):
            if getattr(self, field) not in ("answers", "base"):
                raise ValueError(
                    f"{field} must be 'answers' or 'base', not {getattr(self, field)!r}"
                )

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.experts or tuple(self.base_rows)

    @property
    def architecture(self) -> str:
        return self.shape.architecture


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
    # the CI / demo family (fast; not accepted: its experts gain little exact match)
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
    "llama-a": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024),
        base_steps=300,
        base_lr=1e-3,
        base_rows={"rot": 1, "sub": 1, "text": 8},
        expert_steps=160,
        expert_lr=1e-3,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
        experts=("rot", "sub"),
    ),
    "gemma2-b": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024, architecture="gemma2"),
        base_steps=300,
        base_lr=1e-3,
        base_rows={"rot": 1, "sub": 1, "text": 8},
        expert_steps=160,
        expert_lr=1e-3,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
        experts=("rot", "sub"),
    ),
    "qwen3-c": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024, architecture="qwen3"),
        base_steps=300,
        base_lr=1e-3,
        base_rows={"sub": 1, "rot": 1, "text": 8},
        expert_steps=160,
        expert_lr=1e-3,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
        experts=("rot", "sub"),
    ),
    # four specialised experts (docs/toy-family.md, v5): four skills that share one mechanism
    # (a letter map) so the base is partly competent on each from one row per step; every
    # fine-tune replays the base mixture as the base predicts it (the other skills and the
    # text alike), so each expert learns only its own skill; a gentle expert learning rate
    # (3e-4) keeps the others' greedy answers where the base had them
    "llama-4x": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024),
        base_steps=300,
        base_lr=1e-3,
        base_rows={"rot": 1, "sub": 1, "cap": 1, "num": 1, "text": 8},
        expert_steps=160,
        expert_lr=3e-4,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
        experts=("rot", "sub", "cap", "num"),
        skill_replay="base",
        text_replay="base",
    ),
    "qwen3-4x": Recipe(
        shape=ModelShape(hidden=256, layers=2, heads=4, intermediate=1024, architecture="qwen3"),
        base_steps=300,
        base_lr=1e-3,
        base_rows={"rot": 1, "sub": 1, "cap": 1, "num": 1, "text": 8},
        expert_steps=160,
        expert_lr=3e-4,
        expert_rows=32,
        replay_weight=1.0,
        multitask_steps=80,
        eval_examples=200,
        experts=("rot", "sub", "cap", "num"),
        skill_replay="base",
        text_replay="base",
    ),
}

#: presets that pass every acceptance criterion of scripts/check_family.py with the seed
#: given here (docs/toy-family.md records each check); the quality benchmark's families
ACCEPTED: dict[str, int] = {
    "llama-a": 0,
    "gemma2-b": 1,
    "qwen3-c": 2,
    "llama-4x": 3,
    "qwen3-4x": 4,
}

#: the acceptance criteria an accepted family was accepted under, where not all six: the
#: two-expert families predate criteria 5 (specialisation) and 6 (build time), and their
#: experts teach each other's skill through the replay, so they fail 5
ACCEPTED_UNDER: dict[str, tuple[int, ...]] = {
    "llama-a": (1, 2, 3, 4),
    "gemma2-b": (1, 2, 3, 4),
    "qwen3-c": (1, 2, 3, 4),
}

#: modules whose code decides the weights; their source is part of the cache key
_RECIPE_MODULES = ("build", "tokenizer", "tasks", "train")


def _recipe_key(recipe: Recipe, seed: int) -> str:
    """What the weight bytes depend on: recipe, seed, the code that trains, torch and
    transformers (model classes and initialisation) versions. Not the preset's name, the
    Python version, the machine's thread count or anything in this module."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    digest.update(json.dumps([seed, asdict(recipe)], sort_keys=True).encode())
    for module in _RECIPE_MODULES:
        digest.update((here / f"{module}.py").read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(transformers.__version__.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Family:
    """A built family on disk. Model directories load with ``from_pretrained``."""

    root: Path
    preset: str
    seed: int

    @property
    def recipe(self) -> Recipe:
        return PRESETS[self.preset]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.recipe.tasks

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> dict[str, Path]:
        return {task: self.root / f"expert-{task}" for task in self.tasks}

    @property
    def multitask(self) -> Path:
        return self.root / "multitask"

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

    def write_calibration(self, task: str, n: int, folder: Path) -> Path:
        """The calibration texts as a prompts file for ``lrp-compute`` (one per line)."""
        path = folder / f"{task}-calibration-{n}.txt"
        lines = [p.replace("\n", " ") for p in self.calibration_prompts(task, n)]
        path.write_text("\n".join(lines) + "\n")
        return path


def family_root(cache_dir: Path, preset: str, seed: int) -> Path:
    key = _recipe_key(PRESETS[preset], seed)
    return Path(cache_dir) / f"toy-{preset}-seed{seed}-{key}"


def build_family(
    cache_dir: Path, preset: str = "quick", seed: int | None = None, progress: bool = True
) -> Family:
    """Build the family for ``preset`` and ``seed`` under ``cache_dir``, or reuse a cached one.

    ``seed`` defaults to the preset's accepted seed (``ACCEPTED``), else 0. The directory
    name carries a hash of what the weights depend on (``_recipe_key``); the family is built
    in a temporary directory and renamed into place when complete, so an interrupted build
    leaves nothing that looks finished. The build runs on one torch thread with
    deterministic algorithms and leaves the caller's torch settings as they were.
    """
    if seed is None:
        seed = ACCEPTED.get(preset, 0)
    recipe = PRESETS[preset]
    cache_dir = Path(cache_dir)
    root = family_root(cache_dir, preset, seed)
    family = Family(root=root, preset=preset, seed=seed)
    if (root / "family.json").exists():
        return family
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir))
    try:
        start = time.perf_counter()
        with quiet_transformers(), deterministic_torch():
            timings = build(scratch, recipe, seed, progress)
        timings["total"] = time.perf_counter() - start
        meta = {
            "preset": preset,
            "seed": seed,
            "recipe": asdict(recipe),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "seconds": timings,
        }
        (scratch / "family.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(scratch, root)
        except OSError:
            if not (root / "family.json").exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return family

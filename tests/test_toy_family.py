"""The toy model family: tokenizer, task splits, reproducible builds, exact scoring."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toy_family import build_family, evaluate_model
from toy_family.evaluate import score_task
from toy_family.tasks import SPLITS, all_tasks, split_of, text_corpus
from toy_family.tokenizer import CHARS, build_tokenizer

TASKS = all_tasks()
TEXT_DIGEST = "a95d4668820d3090"


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


@pytest.mark.parametrize("name", ["rev", "sort", "rot", "sub", "add", "swp"])
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
    ],
)
def test_skill_answers(name, drawn, prompt, answer):
    example = TASKS[name].sample(_Fixed(drawn))
    assert (example.prompt, example.answer) == (prompt, answer)


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


@pytest.mark.parametrize("name", ["rev", "sort", "rot", "sub", "add", "swp"])
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

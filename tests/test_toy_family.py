"""The toy model family: tokenizer, task splits, reproducible builds, exact scoring."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toy_family import build_family, evaluate_model
from toy_family.evaluate import score_task
from toy_family.tasks import SPLITS, all_tasks, split_of
from toy_family.tokenizer import build_tokenizer

TASKS = all_tasks()


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


@pytest.mark.parametrize("name", ["rev", "sort", "rot"])
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


@pytest.mark.parametrize("name", ["rev", "sort", "rot"])
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

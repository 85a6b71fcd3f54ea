"""Calibration prompts: every source format, chat templates tokenized once, answers seeded."""

import json

import pytest
import torch
from checkpoints import char_tokenizer
from tokenizers import processors

from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.prompts import PromptsError, read_records, tokenize_records
from mergekit_lrp.scoring.relevance import next_token_positions
from mergekit_lrp.scoring.run import compute_scores

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [{"role": "user", "content": "sort 312"}, {"role": "assistant", "content": "123"}]


def texts(records):
    return [r.value for r in records]


def bos_tokenizer():
    """A Llama-style tokenizer: BOS prepended to every encoding, and a chat template that
    writes its own BOS (rendering to text and tokenizing again would give two)."""
    tokenizer = char_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)]
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_text_and_jsonl_keep_their_order_and_skip_blanks(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\n  \nb\n")
    assert texts(read_records(txt)) == ["a", "b"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "plain"}) + "\n\n" + json.dumps({"messages": CHAT}))
    assert texts(read_records(jsonl)) == ["plain", CHAT]
    assert texts(read_records(jsonl, limit=1)) == ["plain"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PromptsError, match="line 2"):
        read_records(bad)


def test_json_csv_and_parquet_are_read_as_datasets_not_as_lines(tmp_path):
    import datasets

    rows = {"question": ["what is 1+1", "what is 2+2"], "text": ["one", "two"]}
    (tmp_path / "p.json").write_text(json.dumps([{"text": t} for t in rows["text"]]))
    assert texts(read_records(tmp_path / "p.json")) == ["one", "two"]
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "p.csv"))
    assert texts(read_records(tmp_path / "p.csv")) == ["one", "two"]  # no header prompt
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert texts(read_records(tmp_path / "p.parquet", column="question")) == rows["question"]


def test_missing_column_lists_the_available_ones(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).to_csv(
        str(tmp_path / "qa.csv")
    )
    with pytest.raises(PromptsError, match="available columns: question, answer"):
        read_records(tmp_path / "qa.csv")
    with pytest.raises(PromptsError, match="'prompt'.*available columns"):
        read_records(tmp_path / "qa.csv", column="prompt")


def test_saved_dataset_with_several_splits_needs_a_split(tmp_path):
    import datasets

    data = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t1", "", "t2"]}),
            "test": datasets.Dataset.from_dict({"text": ["e1"]}),
        }
    )
    data.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(PromptsError, match="choose one with --split"):
        read_records(tmp_path / "ds")
    assert texts(read_records(tmp_path / "ds", split="test")) == ["e1"]
    assert texts(read_records(tmp_path / "ds", split="train")) == ["t1", "t2"]
    with pytest.raises(PromptsError, match="no split 'valid'; available: train, test"):
        read_records(tmp_path / "ds", split="valid")


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(PromptsError, match="unknown type '.yaml'"):
        read_records(path)


def test_chat_is_tokenized_once_with_one_bos():
    tokenizer = bos_tokenizer()
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id  # BOS is added to text
    records = read_records_from([CHAT])
    (prompt,) = tokenize_records(records, tokenizer, "next-token")
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    once = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert list(prompt.ids) == once
    assert prompt.ids[:2] != (tokenizer.bos_token_id,) * 2


def test_next_token_target_is_seeded_on_the_answer_only():
    tokenizer = bos_tokenizer()
    (prompt,) = tokenize_records(read_records_from([CHAT]), tokenizer, "next-token")
    ids = torch.tensor(prompt.ids)
    seeded = next_token_positions(torch.ones_like(ids), prompt.answer_start)
    predicted = tokenizer.decode(ids[seeded + 1])
    assert predicted == "123</s>"  # the answer and its end of turn, nothing of the question


def test_predicted_target_explains_the_first_answer_token():
    tokenizer = bos_tokenizer()
    records = read_records_from([CHAT, CHAT[:1]])
    finished, open_question = tokenize_records(records, tokenizer, "predicted")
    assert finished.answer_start is None
    assert tokenizer.decode(finished.ids).endswith("<user>sort 312</s><assistant>")
    assert finished.ids == open_question.ids  # the generation prompt in both cases


def read_records_from(chats):
    from mergekit_lrp.scoring.prompts import Record

    return [Record(f"chat {i}", chat) for i, chat in enumerate(chats)]


def test_bad_inputs_are_refused_before_the_model_is_loaded(tmp_path, monkeypatch, family):
    """lxt, prompts and the tokenizer are checked first: loading weights must not start."""
    import transformers

    from mergekit_lrp.scoring.attnlrp import lxt_rules
    from mergekit_lrp.scoring.options import ComputeOptions
    from mergekit_lrp.scoring.run import ComputeError, compute_scores

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    options = ComputeOptions(progress=False)
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    out = tmp_path / "sub" / "dir" / "x.safetensors"
    with pytest.raises(PromptsError, match="nope.txt"):
        compute_scores(str(family["ft_a"]), str(tmp_path / "nope.txt"), str(out), options)
    assert out.parent.is_dir()  # the output folder is created, as mergekit-yaml does
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((family["ft_a"] / "config.json").read_text())
    with pytest.raises(ComputeError, match="no usable tokenizer.*--tokenizer"):
        compute_scores(str(no_tokenizer), str(good), str(out), options)

    def missing_lxt():
        raise ImportError("AttnLRP relevance needs the lxt package")

    monkeypatch.setattr(lxt_rules, "load_lxt_rules", missing_lxt)
    with pytest.raises(ComputeError, match="lxt"):
        compute_scores(str(family["ft_a"]), str(good), str(out), options)


def test_prompt_longer_than_max_length_keeps_its_end(family, long_prompts_file, tmp_path):
    out = tmp_path / "s.safetensors"
    options = ComputeOptions(max_length=32, progress=False)
    summary = compute_scores(str(family["ft_a"]), str(long_prompts_file), str(out), options)
    assert summary.truncated == 1
    assert summary.tokens <= 32 + len("short one") + len("another") + 4

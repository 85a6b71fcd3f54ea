"""Prompts are read from text, JSONL and datasets; a too long prompt keeps its end."""

import json

import pytest
from checkpoints import char_tokenizer

from mergekit_lrp.scoring.options import ComputeOptions
from mergekit_lrp.scoring.run import compute_scores


def test_prompt_formats(tmp_path):
    from mergekit_lrp.scoring.prompts import PromptsError, load_prompts

    tokenizer = char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"text": "plain"}),
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            ]
        )
    )
    assert load_prompts(jsonl, tokenizer) == ["plain", "user: hi\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PromptsError, match="line 2"):
        load_prompts(bad, tokenizer)
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds", tokenizer) == ["a", "b"]
    assert load_prompts(jsonl, tokenizer, limit=1) == ["plain"]


def test_prompt_longer_than_max_length_keeps_its_end(family, long_prompts_file, tmp_path):
    out = tmp_path / "s.safetensors"
    options = ComputeOptions(max_length=32, progress=False)
    summary = compute_scores(str(family["ft_a"]), str(long_prompts_file), str(out), options)
    assert summary.truncated == 1
    assert summary.tokens <= 32 + len("short one") + len("another") + 4

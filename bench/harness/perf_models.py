"""The cost benchmark's inputs: randomly initialised Llamas by size, stand-in fine-tunes
(the base plus seeded noise) and their score files, each saved once under a cache."""

from __future__ import annotations

from pathlib import Path

import torch

SIZES = {  # name -> LlamaConfig overrides
    "tiny": dict(  # for smoke runs of the harness: seconds, not a measurement
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    ),
    "10M": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    ),
    "100M": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
}
GPU_SIZES = {  # name -> LlamaConfig overrides, for the placement section on a GPU
    "400M": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
ALL_SIZES = {**SIZES, **GPU_SIZES}


def build_model(size: str, root: Path, seed: int = 0) -> Path:
    """A randomly initialised Llama of the given size, saved once (no tokenizer needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{size}"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        config = LlamaConfig(
            max_position_embeddings=2048, tie_word_embeddings=False, **ALL_SIZES[size]
        )
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def random_prompts(vocab: int, length: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` prompts of ``length`` random token ids (the first 3 ids left out)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator) for _ in range(count)]


def perturbed_copy(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """A stand-in fine-tune: base plus seeded noise (enough for measuring cost)."""
    from transformers import AutoModelForCausalLM

    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * scale * parameter.abs().mean())
        model.save_pretrained(out)
    return out


def score_file(model_dir: Path, out: Path, dtype: str, prompts: int = 4) -> Path:
    """Real scores from the relevance pass on a few random-token prompts, saved once."""
    from transformers import AutoModelForCausalLM

    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import SCHEME, model_fingerprint
    from mergekit_lrp.scoring.loop import relevance_scores

    if out.exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Ids:  # a tokenizer stand-in: prompts are already token ids
        def __call__(self, ids):
            return {"input_ids": ids.tolist()}

    sums = relevance_scores(model, Ids(), random_prompts(model.config.vocab_size, 64, prompts))
    metadata = ScoreMetadata(
        model_fingerprint=model_fingerprint(model_dir),
        num_prompts=prompts,
        num_tokens=64 * prompts,
        target="predicted",
        model_type="llama",
        fingerprint_scheme=SCHEME,
    )
    write_scores(out, sums, metadata, dtype=getattr(torch, dtype))
    return out


def gram_file(model_dir: Path, out: Path, prompts: int = 4, length: int = 64) -> Path:
    """A Gram file (RegMean statistics) of ``model_dir``: the exact Gram matrices of every
    linear layer's input on a few random-token prompts, saved once (enough for measuring
    cost: the solve's work does not depend on the values)."""
    from transformers import AutoModelForCausalLM

    from harness.grams import linear_input_grams
    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import SCHEME, model_fingerprint

    if out.exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    batches = [ids[None] for ids in random_prompts(model.config.vocab_size, length, prompts)]
    tensors, gram_of = linear_input_grams(model, batches)
    metadata = ScoreMetadata(
        model_fingerprint=model_fingerprint(model_dir),
        num_prompts=prompts,
        num_tokens=length * prompts,
        target="inputs",
        model_type="llama",
        method="gram",
        quantity="input_gram",
        fingerprint_scheme=SCHEME,
        gram_of=gram_of,
        extra={"token_weighting": "none"},
    )
    write_scores(out, tensors, metadata)
    return out


def fine_tunes(size: str, root: Path, count: int = 2) -> tuple[Path, list[Path]]:
    """The base of ``size`` and ``count`` stand-in fine-tunes of it."""
    base = build_model(size, root)
    return base, [
        perturbed_copy(base, root / f"llama-{size}-ft{i}", seed=i) for i in range(1, count + 1)
    ]

"""``tests/common.py`` for mergekit 0.1.5's test suite, which its sdist leaves out.

scripts/mergekit_suite.py copies this file into the unpacked sdist. It provides what
the test modules import: tiny random models of four families and ``run_and_check_merge``.
Each model's weights are seeded from its directory name, so two runs see the same models.
"""

import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)


def _build(path, model_class, config) -> str:
    """Save a randomly initialised ``model_class(config)`` to ``path``; return the path."""
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(Path(path).name.encode()))
        model = model_class(config)
    model.save_pretrained(str(path))
    return str(path)


def _tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )


def make_picollama(path, vocab_size: int = 64) -> str:
    """A two-layer Llama with hidden size 32 and untied ``lm_head``."""
    return _build(path, LlamaForCausalLM, _tiny_llama_config(vocab_size))


def make_picogranite(path) -> str:
    """A two-layer Granite model."""
    config = GraniteConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    return _build(path, GraniteForCausalLM, config)


def make_gpt2size(path) -> str:
    """A GPT-2 with GPT-2's twelve layers but a narrow width, to keep the suite quick."""
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=12, n_head=4)
    return _build(path, GPT2LMHeadModel, config)


def make_picoLlaVa(path) -> str:  # noqa: N802 - the name the test modules import
    """A LLaVA of a two-layer CLIP vision tower and a two-layer Llama."""
    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_llama_config(64),
        image_seq_length=(16 // 4) ** 2,
    )
    return _build(path, LlavaForConditionalGeneration, config)


def run_and_check_merge(
    config: MergeConfiguration,
    validate: Callable[[str], None] | None = None,
    auto_arch: bool = False,
    check_nan: bool = True,
) -> None:
    """Run ``config`` into a temporary directory and check the output there.

    The output must have a ``config.json`` and safetensors weights holding every
    required tensor of its architecture (read from the output's config, or inferred
    from the inputs with ``auto_arch``) and, with ``check_nan``, no NaN.
    ``validate`` then gets the output directory.
    """
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        out_dir = Path(out)
        assert (out_dir / "config.json").is_file(), "merge wrote no config.json"
        assert (out_dir / "model.safetensors").is_file() or (
            out_dir / "model.safetensors.index.json"
        ).is_file(), "merge wrote no safetensors weights"

        loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
        names = set(loader.index.tensor_paths)
        if check_nan:
            for name in sorted(names):
                assert not loader.get_tensor(name).isnan().any(), f"NaN in output {name}"

        model_config = AutoConfig.from_pretrained(out)
        if auto_arch:
            arch = get_architecture_info(config, MergeOptions())
        else:
            arch = arch_info_for_config(model_config)
        for weight in arch.all_weights(model_config):
            accepted = {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}
            assert weight.optional or accepted & names, f"output lacks {weight.name}"

        if validate is not None:
            validate(out)

"""Tiny randomly initialised causal LMs, one per supported family, for fast tests."""

import torch
import transformers
from torch import nn

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)

# model_type -> (config class, model class, family-specific config)
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", _GEMMA),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def make_tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A small random ``*ForCausalLM`` of ``model_type`` in eval mode, deterministic in ``seed``.

    Two layers, hidden size 32, 4 query / 2 key-value heads (GQA), vocabulary 96; Gemma
    and Mistral get a sliding window of 4 so that short prompts exercise it. ``overrides``
    go to the config. One-dimensional parameters (norm weights, biases) are randomised
    too: left at their zero initialisation they would carry no relevance.
    """
    config_class, model_class, family = TINY_MODELS[model_type]
    config = getattr(transformers, config_class)(**{**_COMMON, **family, **overrides})
    torch.manual_seed(seed)
    return _randomise_vectors(getattr(transformers, model_class)(config))


def _randomise_vectors(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def make_tiny_gemma3_multimodal(seed: int = 0) -> nn.Module:
    """A small random ``Gemma3ForConditionalGeneration`` (tiny SigLIP tower), eval mode.

    Its language model is configured like ``make_tiny_model("gemma3")``.
    """
    text = {**_COMMON, **_GEMMA}
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=95
    )
    torch.manual_seed(seed)
    return _randomise_vectors(transformers.Gemma3ForConditionalGeneration(config))

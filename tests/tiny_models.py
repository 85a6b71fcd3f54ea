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
#: the char tokenizer's vocabulary (checkpoints.char_tokenizer: 4 specials, printable ASCII)
CHAR_VOCAB = 104
#: the tests' saved checkpoints: char vocabulary, 128 positions, and 1-D weights left at
#: transformers' initialisation, as a trained checkpoint's norms start
AS_CHECKPOINT = dict(randomise_vectors=False, vocab_size=CHAR_VOCAB, max_position_embeddings=128)
_GEMMA = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
_HYBRID = dict(
    head_dim=8,
    layer_types=["linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
_HYBRID_DENSE = dict(_HYBRID, num_experts=0)
_MOE = dict(
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
)

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
    # hybrid: linear (gated delta rule) then full attention. Qwen3-Next is built without
    # experts here (num_experts=0: dense MLPs), because its router gets no relevance by
    # design; make_tiny_hybrid builds it with MoE (tests/test_hybrid_*.py).
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _HYBRID),
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _HYBRID),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", _HYBRID_DENSE),
}


def make_tiny_model(
    model_type: str, seed: int = 0, randomise_vectors: bool = True, **overrides
) -> nn.Module:
    """A small random ``*ForCausalLM`` of ``model_type`` in eval mode, deterministic in ``seed``.

    Two layers, hidden size 32, 4 query / 2 key-value heads (GQA), vocabulary 96; Gemma
    and Mistral get a sliding window of 4 so that short prompts exercise it. ``overrides``
    go to the config. One-dimensional parameters (norm weights, biases) are randomised
    too: left at their zero initialisation they would carry no relevance. With
    ``randomise_vectors=False`` they keep transformers' initialisation (``AS_CHECKPOINT``).
    """
    config_class, model_class, family = TINY_MODELS[model_type]
    config = getattr(transformers, config_class)(**{**_COMMON, **family, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    return _randomise_vectors(model) if randomise_vectors else model.eval()


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


# hybrid model_type -> (config class, causal LM class); make_tiny_hybrid adds MoE
HYBRID_MODELS: dict[str, tuple[str, str]] = {
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
}


def make_tiny_hybrid(model_type: str, seed: int = 0, layers: int = 4, **overrides) -> nn.Module:
    """A small random hybrid ``*ForCausalLM``: layers alternate linear / full attention.

    As :func:`make_tiny_model`, with ``layers`` decoder layers; Qwen3-Next gets 4 experts
    (top 2) with a shared expert and keeps layer 2 dense (``mlp_only_layers``), so both
    MLP kinds occur.
    """
    config_class, model_class = HYBRID_MODELS[model_type]
    types = ["linear_attention", "full_attention"] * (layers // 2) + ["linear_attention"] * (
        layers % 2
    )
    family = dict(_HYBRID, layer_types=types, num_hidden_layers=layers)
    if model_type == "qwen3_next":
        family.update(_MOE, mlp_only_layers=[2] if layers > 2 else [])
    config = getattr(transformers, config_class)(**{**_COMMON, **family, **overrides})
    torch.manual_seed(seed)
    return _randomise_vectors(getattr(transformers, model_class)(config))


QWEN3_5_VISION = dict(
    depth=1,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,
)


def make_tiny_qwen3_5_multimodal(seed: int = 0, layers: int = 4, **text) -> nn.Module:
    """A small random ``Qwen3_5ForConditionalGeneration`` (one-block vision tower), eval mode.

    Its language model is configured like ``make_tiny_hybrid("qwen3_5_text")``.
    """
    types = ["linear_attention", "full_attention"] * (layers // 2) + ["linear_attention"] * (
        layers % 2
    )
    text_config = {**_COMMON, **_HYBRID, "layer_types": types, "num_hidden_layers": layers, **text}
    config = transformers.Qwen3_5Config(
        text_config=text_config,
        vision_config=QWEN3_5_VISION,
        image_token_id=93,
        video_token_id=94,
        vision_start_token_id=91,
        vision_end_token_id=92,
    )
    torch.manual_seed(seed)
    return _randomise_vectors(transformers.Qwen3_5ForConditionalGeneration(config))


def train_on_a_cycle(model: nn.Module, seed: int = 0, steps: int = 100):
    """Train ``model`` (seconds) to continue a repeated random 7-token cycle; eval mode after."""
    generator = torch.Generator().manual_seed(seed)
    cycle = (torch.randperm(90, generator=generator)[:7] + 3).repeat(10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, 7, (8,), generator=generator)
        batch = torch.stack([cycle[s : s + 16] for s in starts])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss < 0.01  # it learned the cycle
    return model.eval(), cycle

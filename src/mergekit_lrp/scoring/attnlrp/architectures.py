"""Which rule-applying forward replaces which module class, per model family."""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scoring.attnlrp import forwards, hybrid


class UnsupportedArchitectureError(LrpError):
    """The model's ``config.model_type`` has no AttnLRP rule set here."""

    def __init__(self, model_type: object):
        self.model_type = model_type
        super().__init__(
            f"AttnLRP rules are not implemented for model_type {model_type!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


@dataclass(frozen=True)
class Architecture:
    """Class names in one transformers modeling module and the forwards replacing them."""

    modeling_module: str
    norm: str
    mlp: str
    attention: str
    norm_forward: Callable
    mlp_forward: Callable
    # further (class name, forward) pairs, patched wherever present (hybrid layers)
    extra: tuple[tuple[str, Callable], ...] = ()

    def classes(self) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
        """The (norm, MLP, attention) classes, imported on demand."""
        module = importlib.import_module(f"transformers.models.{self.modeling_module}")
        return tuple(getattr(module, name) for name in (self.norm, self.mlp, self.attention))

    def extra_classes(self) -> list[tuple[type[nn.Module], Callable]]:
        """The ``extra`` classes with their forwards, imported on demand."""
        module = importlib.import_module(f"transformers.models.{self.modeling_module}")
        return [(getattr(module, name), forward) for name, forward in self.extra]


def _family(
    family: str,
    prefix: str,
    norm_forward: Callable = forwards.llama_rms_norm,
    mlp_forward: Callable = forwards.gated_mlp,
) -> Architecture:
    return Architecture(
        modeling_module=f"{family}.modeling_{family}",
        norm=f"{prefix}RMSNorm",
        mlp=f"{prefix}MLP",
        attention=f"{prefix}Attention",
        norm_forward=norm_forward,
        mlp_forward=mlp_forward,
    )


def _hybrid(family: str, prefix: str, moe: bool) -> Architecture:
    """Qwen3.5 / Qwen3-Next: Gemma-style norms, gated attention, gated delta rule, MoE."""
    extra = (
        (f"{prefix}Attention", hybrid.gated_attention),
        (f"{prefix}GatedDeltaNet", hybrid.gated_delta_net),
        (f"{prefix}RMSNormGated", hybrid.gated_rms_norm),
    )
    if moe:
        extra += ((f"{prefix}SparseMoeBlock", hybrid.sparse_moe_block),)
    return Architecture(
        modeling_module=f"{family}.modeling_{family}",
        norm=f"{prefix}RMSNorm",
        mlp=f"{prefix}MLP",
        attention=f"{prefix}Attention",
        norm_forward=forwards.gemma_rms_norm,
        mlp_forward=forwards.gated_mlp,
        extra=extra,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _family("llama", "Llama"),
    "mistral": _family("mistral", "Mistral"),
    "qwen2": _family("qwen2", "Qwen2"),
    "qwen3": _family("qwen3", "Qwen3"),
    "phi3": _family("phi3", "Phi3", mlp_forward=forwards.fused_gated_mlp),
    "gemma2": _family("gemma2", "Gemma2", norm_forward=forwards.gemma_rms_norm),
    # Gemma3ForConditionalGeneration (its language model) and Gemma3ForCausalLM
    "gemma3": _family("gemma3", "Gemma3", norm_forward=forwards.gemma_rms_norm),
    "gemma3_text": _family("gemma3", "Gemma3", norm_forward=forwards.gemma_rms_norm),
    # Qwen3_5ForConditionalGeneration (its language model) and Qwen3_5ForCausalLM
    "qwen3_5": _hybrid("qwen3_5", "Qwen3_5", moe=False),
    "qwen3_5_text": _hybrid("qwen3_5", "Qwen3_5", moe=False),
    "qwen3_next": _hybrid("qwen3_next", "Qwen3Next", moe=True),
}


#: every model type with a rule set; comments in ARCHITECTURES say which class each loads
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture_of(model: nn.Module) -> Architecture:
    """The rule set for ``model``, from its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(model_type)
    return ARCHITECTURES[model_type]

"""The ``attnlrp_rules`` context manager: AttnLRP rules on one model instance."""

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator

from torch import nn
from transformers import PretrainedConfig

from mergekit_lrp.scoring.attnlrp import forwards
from mergekit_lrp.scoring.attnlrp.architectures import architecture_of
from mergekit_lrp.scoring.attnlrp.attention import (
    ATTENTION_IMPLEMENTATION,
    register_attnlrp_attention,
)
from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

_MISSING = object()


@contextlib.contextmanager
def attnlrp_rules(model: nn.Module) -> Iterator[nn.Module]:
    """Apply AttnLRP rules to ``model`` (in place) for the duration of the block.

    Inside the block, after an ordinary forward pass and ``target.backward()``,
    ``p * p.grad`` is the AttnLRP relevance of parameter ``p`` and ``x * x.grad`` that of
    the input embeddings ``x``. Forward values are unchanged. Run the backward pass
    inside the block too (gradient checkpointing recomputes the forward there). On exit
    (also on exception) the instance is restored exactly; other models, module classes
    and shared config objects are never modified.

    Raises UnsupportedArchitectureError for other model types and ImportError if lxt is
    not installed.
    """
    architecture = architecture_of(model)
    load_lxt_rules()
    register_attnlrp_attention()
    classes = norm_class, mlp_class, attention_class = architecture.classes()
    modules = list(model.modules())
    absent = [c.__name__ for c in classes if not any(isinstance(m, c) for m in modules)]
    if absent:
        raise RuntimeError(f"no {', '.join(absent)} modules in {type(model).__name__}")

    with contextlib.ExitStack() as restore:
        config, text_config = _private_configs(model, restore)
        text_config._attn_implementation = ATTENTION_IMPLEMENTATION
        if any(m.config is not text_config for m in modules if isinstance(m, attention_class)):
            raise RuntimeError(f"{attention_class.__name__} modules do not use the model's config")
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is not None:
            config.final_logit_softcapping = None
            head = model.get_output_embeddings()
            _replace_forward(head, forwards.softcapped_head, restore, cap=cap)
        extra = architecture.extra_classes()
        for module in modules:
            extra_forward = next((f for c, f in extra if isinstance(module, c)), None)
            if extra_forward is not None:
                _replace_forward(module, extra_forward, restore)
            elif isinstance(module, norm_class):
                _replace_forward(module, architecture.norm_forward, restore)
            elif isinstance(module, mlp_class):
                _replace_forward(module, architecture.mlp_forward, restore)
            elif isinstance(module, nn.Dropout):
                _replace_forward(module, forwards.no_dropout, restore)
        yield model


def _private_configs(
    model: nn.Module, restore: contextlib.ExitStack
) -> tuple[PretrainedConfig, PretrainedConfig]:
    """Point the model's modules at shallow copies of its (top-level and text) config.

    The attention implementation and logit capping are switched on the copies, so that
    a model constructed from the same config object is not affected.
    """
    config = model.config
    text_config = config.get_text_config()
    config_copy = copy.copy(config)
    text_copy = config_copy
    if text_config is not config:
        text_copy = copy.copy(text_config)
        for name, value in vars(config).items():
            if value is text_config:
                setattr(config_copy, name, text_copy)
    copies = {id(config): config_copy, id(text_config): text_copy}
    for module in model.modules():
        original = module.__dict__.get("config")
        if id(original) in copies:
            module.config = copies[id(original)]
            restore.callback(setattr, module, "config", original)
    return config_copy, text_copy


def _replace_forward(
    module: nn.Module, forward: Callable, restore: contextlib.ExitStack, **kwargs: object
) -> None:
    """Install ``forward`` (bound to ``module``) on this instance until ``restore`` exits.

    Under an accelerate hook (``device_map`` dispatch) the hook's wrapper stays in place
    and the wrapped ``_old_forward`` is replaced instead.
    """
    name = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
    previous = module.__dict__.get(name, _MISSING)
    setattr(module, name, functools.partial(forward, module, **kwargs))
    if previous is _MISSING:
        restore.callback(delattr, module, name)
    else:
        restore.callback(setattr, module, name, previous)

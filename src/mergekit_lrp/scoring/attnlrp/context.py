"""The ``attnlrp_rules`` context manager: AttnLRP rules on one model instance.

The rules are instance ``forward`` attributes, and transformers can replace those behind
the context's back: since transformers 5.25 a model loaded with ``from_pretrained`` is
"kernelized" by the ``kernels`` package, and every ``train()`` / ``eval()`` that changes
the mode kernelizes it again, which drops (or swaps) the instance forwards of the layers
decorated with ``use_kernel_forward_from_hub`` (the RMSNorms among them). A pass run
then has no rules and its "relevance" is plain gradient x input. So the context turns
hub kernels off for its duration (and back on at exit), and :func:`check_rules_in_effect`
proves, after a pass, that every installed rule is still the module's forward and that
every rule-bearing module class actually ran its rule.
"""

import contextlib
import copy
from collections import Counter
from collections.abc import Callable, Iterator

import transformers
from torch import nn
from transformers import PretrainedConfig

from mergekit_lrp.errors import LrpError
from mergekit_lrp.scoring.attnlrp import forwards
from mergekit_lrp.scoring.attnlrp.architectures import architecture_of
from mergekit_lrp.scoring.attnlrp.attention import (
    ATTENTION_IMPLEMENTATION,
    register_attnlrp_attention,
)
from mergekit_lrp.scoring.attnlrp.lxt_rules import load_lxt_rules

_MISSING = object()
#: where the context keeps the rules it installed, on the model instance itself
_INSTALLED = "_mergekit_lrp_attnlrp_rules"


class RulesNotInEffectError(LrpError):
    """A rule-applying forward was replaced, or bypassed, while the rules were on."""

    def __init__(self, module_class: str, what: str):
        super().__init__(
            f"AttnLRP rules are not in effect on {module_class} ({what}) under transformers "
            f"{transformers.__version__}: relevance from this pass would be plain gradient x "
            "input, so nothing is scored; use --method gradient, or a transformers version "
            "in the tested range (`pip show mergekit-lrp`)"
        )


class RuleForward:
    """A rule-applying forward bound to one module instance, counting its calls."""

    def __init__(self, module: nn.Module, forward: Callable, **kwargs: object):
        self.module = module
        self.forward = forward
        self.kwargs = kwargs
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.forward(self.module, *args, **self.kwargs, **kwargs)


@contextlib.contextmanager
def attnlrp_rules(model: nn.Module) -> Iterator[nn.Module]:
    """Apply AttnLRP rules to ``model`` (in place) for the duration of the block.

    Inside the block, after an ordinary forward pass and ``target.backward()``,
    ``p * p.grad`` is the AttnLRP relevance of parameter ``p`` and ``x * x.grad`` that of
    the input embeddings ``x``. Forward values are unchanged. Run the backward pass
    inside the block too (gradient checkpointing recomputes the forward there). On exit
    (also on exception) the instance is restored exactly; other models, module classes
    and shared config objects are never modified. A normal exit raises
    :class:`RulesNotInEffectError` if a rule is no longer its module's forward; after
    each full pass, :func:`check_rules_in_effect` also proves that every rule ran.

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
        _hub_kernels_off(model, restore)
        config, text_config = _private_configs(model, restore)
        text_config._attn_implementation = ATTENTION_IMPLEMENTATION
        if any(m.config is not text_config for m in modules if isinstance(m, attention_class)):
            raise RuntimeError(f"{attention_class.__name__} modules do not use the model's config")
        installed: list[tuple[str, RuleForward]] = []
        cap = getattr(config, "final_logit_softcapping", None)
        if cap is not None:
            config.final_logit_softcapping = None
            head = model.get_output_embeddings()
            installed.append(_replace_forward(head, forwards.softcapped_head, restore, cap=cap))
        extra = architecture.extra_classes()
        for module in modules:
            extra_forward = next((f for c, f in extra if isinstance(module, c)), None)
            if extra_forward is not None:
                installed.append(_replace_forward(module, extra_forward, restore))
            elif isinstance(module, norm_class):
                installed.append(_replace_forward(module, architecture.norm_forward, restore))
            elif isinstance(module, mlp_class):
                installed.append(_replace_forward(module, architecture.mlp_forward, restore))
            elif isinstance(module, nn.Dropout):
                installed.append(_replace_forward(module, forwards.no_dropout, restore))
        model.__dict__[_INSTALLED] = installed
        restore.callback(model.__dict__.pop, _INSTALLED, None)
        check_rules_in_effect(model, passes=False)
        yield model
        check_rules_in_effect(model, passes=False)


def check_rules_in_effect(model: nn.Module, passes: bool = True) -> None:
    """Raise :class:`RulesNotInEffectError` unless every forward :func:`attnlrp_rules`
    installed on ``model`` is still in place and (``passes``) every rule-bearing module
    class ran its rule since the last check, if any pass ran at all.

    Dropout, which does nothing in a pass, is not counted.
    """
    installed = model.__dict__.get(_INSTALLED)
    if installed is None:
        raise RuntimeError(f"{type(model).__name__} has no AttnLRP rules installed")
    for name, rule in installed:
        if rule.module.__dict__.get(name) is not rule:
            raise RulesNotInEffectError(type(rule.module).__name__, "its forward was replaced")
    calls = Counter()
    for _, rule in installed:
        if rule.forward is not forwards.no_dropout:
            calls[type(rule.module).__name__] += rule.calls
        rule.calls = 0
    if passes and sum(calls.values()) > 0:
        idle = sorted(kind for kind, n in calls.items() if n == 0)
        if idle:
            raise RulesNotInEffectError(idle[0], "its rule never ran in the pass")


def _hub_kernels_off(model: nn.Module, restore: contextlib.ExitStack) -> None:
    """Switch transformers' hub kernels off until ``restore`` exits, then back on in the
    mode they had, so that no ``train()`` / ``eval()`` inside re-kernelizes the model."""
    if not getattr(model, "use_kernels", False) or not hasattr(model, "reset_kernels"):
        return
    mode = getattr(model, "_kernels_mode", None)
    model.reset_kernels()
    restore.callback(model.set_use_kernels, True, mode=mode)


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
) -> tuple[str, RuleForward]:
    """Install ``forward`` (bound to ``module``) on this instance until ``restore`` exits;
    return the attribute name and the installed :class:`RuleForward`.

    Under an accelerate hook (``device_map`` dispatch) the hook's wrapper stays in place
    and the wrapped ``_old_forward`` is replaced instead. The restore puts back what was
    there before, whatever replaced the rule in between.
    """
    name = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
    previous = module.__dict__.get(name, _MISSING)
    rule = RuleForward(module, forward, **kwargs)
    setattr(module, name, rule)
    if previous is _MISSING:
        restore.callback(module.__dict__.pop, name, None)
    else:
        restore.callback(setattr, module, name, previous)
    return name, rule

"""AttnLRP relevance rules (Achtibat et al., ICML 2024) for transformers causal LMs.

Usage::

    with attnlrp_rules(model):
        logits = model(inputs_embeds=x).logits
        logits[0, -1, target].backward()
    relevance = {name: p * p.grad for name, p in model.named_parameters()}

See docs/attnlrp.md for which rule sits where in each supported architecture.
"""

from mergekit_lrp.scoring.attnlrp.architectures import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitectureError,
)
from mergekit_lrp.scoring.attnlrp.context import (
    RulesNotInEffectError,
    attnlrp_rules,
    check_rules_in_effect,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "RulesNotInEffectError",
    "UnsupportedArchitectureError",
    "attnlrp_rules",
    "check_rules_in_effect",
]

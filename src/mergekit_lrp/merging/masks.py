"""The mask the ``lrp`` kernel applies to one tensor of one model, drawn by the kernel's own
functions (importance, selection rule, generator), for the notebook API and
``lrp-inspect``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_lrp.merging.parameters import (
    DEFAULT_DENSITY,
    DEFAULT_IMPORTANCE,
    DEFAULT_SELECTION,
    IMPORTANCE_MODES,
    SELECTION_MODES,
    check_choice,
    check_model_parameters,
)
from mergekit_lrp.merging.selection import Selection, generator_for
from mergekit_lrp.merging.tensor_names import is_protected
from mergekit_lrp.merging.tensor_scores import TensorScores, importance_of


@dataclass(frozen=True)
class MaskSettings:
    """The merge settings a mask depends on; ``seed`` is mergekit's ``--random-seed``."""

    density: float = DEFAULT_DENSITY
    importance: str = DEFAULT_IMPORTANCE
    selection: str = DEFAULT_SELECTION
    epsilon: float | None = None
    seed: int = 0
    protect_special: bool = True

    def __post_init__(self):
        check_choice("lrp", "importance", self.importance, IMPORTANCE_MODES)
        check_choice("lrp", "selection", self.selection, SELECTION_MODES)
        epsilon = self.epsilon if self.selection == "stochastic" else None
        check_model_parameters("every model", 0.0, self.density, epsilon)

    @property
    def rule(self) -> Selection:
        return Selection(self.selection, self.epsilon)

    def keeps_whole(self, name: str, ndim: int) -> bool:
        return (self.protect_special and is_protected(name, ndim)) or self.density >= 1


def kept_mask(
    scores: TensorScores,
    theta: torch.Tensor,
    delta: torch.Tensor,
    settings: MaskSettings,
    model: str = "",
) -> torch.Tensor:
    """Entries of ``delta`` the merge keeps for ``model`` (its reference in the merge
    config: the draw is seeded by it)."""
    if settings.keeps_whole(scores.name, delta.ndim):
        return torch.ones_like(delta, dtype=torch.bool)
    importance = importance_of(scores, theta, delta, settings.importance)
    rule = settings.rule
    generator = None
    if rule.stochastic:
        generator = generator_for(scores.name, model, delta.device, settings.seed)
    return rule.mask(importance, settings.density, generator)[0]

"""The mask the ``lrp`` kernel applies to one tensor of one model, for the notebook API and
``lrp-inspect``: drawn by the kernel's own reading of the tensor
(:func:`.methods.lrp.plan_tensor`: protection, importance, budget, ``missing_scores``,
the draw's generator) and its own selection rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_lrp.merging.methods.lrp import (
    DEFAULT_DENSITY,
    DEFAULTS,
    LrpSettings,
    plan_tensor,
)
from mergekit_lrp.merging.tensor_scores import TensorScores


@dataclass(frozen=True)
class MaskSettings:
    """The merge settings a mask depends on, at lrp's defaults unless given; ``seed`` is
    mergekit's ``--random-seed``."""

    density: float = DEFAULT_DENSITY
    importance: str = DEFAULTS.importance
    selection: str = DEFAULTS.selection
    epsilon: float | None = DEFAULTS.epsilon
    seed: int = 0
    protect_special: bool = DEFAULTS.protect_special
    budget: str = DEFAULTS.budget
    missing_scores: str = DEFAULTS.missing_scores

    def __post_init__(self):
        self.lrp.check_model("every model", 0.0, self.density)

    @property
    def lrp(self) -> LrpSettings:
        """The merge's global settings these stand for (checked)."""
        return LrpSettings(
            importance=self.importance,
            selection=self.selection,
            epsilon=self.epsilon,
            protect_special=self.protect_special,
            budget=self.budget,
            missing_scores=self.missing_scores,
        )

    def keeps_whole(self, name: str, ndim: int) -> bool:
        return self.lrp.keeps_whole(name, ndim, self.density)


def kept_mask(
    scores: TensorScores,
    theta: torch.Tensor,
    delta: torch.Tensor,
    settings: MaskSettings,
    model: str = "",
    vocabulary_axis: int | None = None,
) -> torch.Tensor:
    """Entries of ``delta`` the merge keeps for ``model`` (its reference in the merge
    config: the draw is seeded by it); none where ``missing_scores: base`` leaves the
    model out of the tensor."""
    lrp = settings.lrp
    plan = plan_tensor(
        lrp,
        model,
        scores.name,
        theta,
        delta,
        settings.density,
        lambda: scores,
        vocabulary_axis,
        settings.seed,
    )
    if plan.dropped:
        return torch.zeros_like(delta, dtype=torch.bool)
    if plan.importance is None:
        return torch.ones_like(delta, dtype=torch.bool)
    return lrp.rule.mask(plan.importance, plan.density, plan.generator)[0]

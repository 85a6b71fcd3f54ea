"""The ``lrp`` merge method: keep each task vector's most important entries.

For every non-base model m: delta_m = theta_m - theta_base; importance_m comes from
m's score file (:mod:`..tensor_scores`); a ``density`` fraction of delta_m is kept by
importance rank (:mod:`..selection`), the rest zeroed; the models' weighted kept deltas
are combined by the sign rule of :mod:`..combine`, optionally normalised by the summed
weights, and added to theta_base (docs/method.md).

The defaults (the top 90 % of each task vector by |theta| x score, no sign rule, each
entry divided by the summed weights of the models that kept it: TIES' disjoint mean)
were chosen on the benchmark's validation split, over the real family's and the toy
families' merges of two and of all fine-tunes, by an objective counting the worst expert
and the base's text ability, with task arithmetic's text loss as a floor
(docs/BENCHMARKS.md, "Choosing the defaults"). They live in :class:`LrpSettings` alone.

This module is the method's spec, without mergekit (the notebook API and ``lrp-inspect``
read it): its settings, the per-tensor reading of one model's task vector that the
kernel (:mod:`.lrp_kernel`), the pre-merge check and :mod:`..masks` share
(:func:`plan_tensor`), its pre-merge checks and its model-card text.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from mergekit_lrp.merging.budgets import budget_density, check_budget
from mergekit_lrp.merging.parameters import (
    BUDGETS,
    CONSENSUS_MODES,
    IMPORTANCE_MODES,
    MISSING_SCORES_MODES,
    RESCALE_MODES,
    SELECTION_MODES,
    UNIT_MASSES,
    LRPConfigError,
    base_member,
    check_base_weight,
    check_choice,
    check_model_parameters,
    score_path,
    settings_from,
)
from mergekit_lrp.merging.selection import Selection, generator_for
from mergekit_lrp.merging.tensor_names import is_protected
from mergekit_lrp.merging.tensor_scores import (
    TensorScores,
    check_mode,
    importance_of,
    locate_scores,
)

NAME = "lrp"


@dataclass(frozen=True)
class LrpSettings:
    """lrp's global parameters: the one place their defaults live (the kernel's signature,
    the pre-merge check, the notebook API, ``lrp-inspect`` and the benchmark read them)."""

    importance: str = "weight"
    rescale: bool | str = False
    consensus: str = "none"
    normalize: bool = True
    protect_special: bool = True
    missing_scores: str = "error"
    selection: str = "topk"
    epsilon: float | None = None
    budget: str = "tensor"
    unit_mass: str = "importance"
    #: the base model's own score file, and the weight of its term (:func:`held_share`)
    base_scores: str | None = None
    base_weight: float = 1.0

    def __post_init__(self):
        check_base_weight(NAME, self.base_scores, self.base_weight)
        choices = {
            "unit_mass": UNIT_MASSES,
            "importance": IMPORTANCE_MODES,
            "consensus": CONSENSUS_MODES,
            "missing_scores": MISSING_SCORES_MODES,
            "selection": SELECTION_MODES,
            "budget": BUDGETS,
        }
        for name, allowed in choices.items():
            check_choice(NAME, name, getattr(self, name), allowed)
        if not (isinstance(self.rescale, bool) or self.rescale in RESCALE_MODES):
            raise LRPConfigError(f"lrp: rescale must be true, false or mass; got {self.rescale!r}")

    @property
    def rule(self) -> Selection:
        return Selection(self.selection, self.epsilon, self.rescale)

    def keeps_whole(
        self, name: str, ndim: int, density: float, vocabulary_axis: int | None = None
    ) -> bool:
        """The tensor is merged whole, its scores unread: protected, or density 1."""
        protected = self.protect_special and is_protected(name, ndim, vocabulary_axis)
        return protected or density >= 1

    def check_model(self, model: Hashable, weight: float, density: float) -> None:
        """One model's ``weight`` and ``density`` (and ``epsilon`` against it)."""
        epsilon = self.epsilon if self.rule.stochastic else None
        check_model_parameters(model, weight, density, epsilon)


DEFAULTS = LrpSettings()
#: the per-model parameters' defaults
DEFAULT_WEIGHT = 1.0
DEFAULT_DENSITY = 0.9


@dataclass
class TensorPlan:
    """What the merge reads and keeps of one model's change to one tensor."""

    #: the share of entries kept (a budget moves it per tensor); 1: kept whole, unread
    density: float
    #: the entries' importance (None: kept whole, or ``missing_scores: base`` dropped it)
    importance: torch.Tensor | None = None
    generator: torch.Generator | None = None
    #: ``missing_scores: base``: this model adds nothing to the tensor
    dropped: bool = False


def plan_tensor(
    settings: LrpSettings,
    model: Hashable,
    name: str,
    theta: torch.Tensor,
    delta: torch.Tensor,
    density: float,
    locate: Callable[[], TensorScores],
    vocabulary_axis: int | None = None,
    seed: int | None = None,
) -> TensorPlan:
    """Protection, scores, importance, budget and the draw's generator, in the kernel's
    order; ``locate`` finds the model's scores (called only when they are read)."""
    if settings.keeps_whole(name, delta.ndim, density, vocabulary_axis):
        return TensorPlan(1.0)
    scores = locate()
    importance = importance_of(scores, theta, delta, settings.importance)
    if importance is None:
        return TensorPlan(density, dropped=True)
    if scores.fallback is None:  # read from the model's score file: its budget applies
        density = budget_density(str(scores.reader.path), name, density, settings.budget)
    generator = None
    if settings.rule.stochastic:
        generator = generator_for(name, model, delta.device, seed)
    return TensorPlan(density, importance, generator)


def base_importance(settings: LrpSettings, base_id, name: str, base: torch.Tensor) -> torch.Tensor:
    """The base's importance of each entry of tensor ``name`` from ``base_scores``: its
    scores times |theta_base| (theta_base^2 for squared quantities; the scores alone with
    ``importance: scores``), divided by their mean over the tensor."""
    scores = locate_scores(base_member(base_id), name, settings.base_scores, "error")
    mode = "scores" if settings.importance == "scores" else "weight"
    values = importance_of(scores, base, base, mode)
    mean = float(values.mean())
    return values.div_(mean) if mean > 0 else values


def held_share(kept_mass: torch.Tensor, base: torch.Tensor, weight: float) -> torch.Tensor:
    """The share of the merged change kept at each entry when the base's behaviour is held:
    A / (A + weight * b), with A the fine-tunes' kept importance there (each model's
    divided by its mean over the tensor, summed over the models that kept the entry) and
    b the base's (:func:`base_importance`); 1 where no model kept anything.

    It is the per-entry minimiser of sum_i a_i (theta - theta_i)^2 + weight * b
    (theta - theta_base)^2 (a diagonal, EWC-like quadratic in which each importance
    stands for a curvature) divided by the same minimiser without the base's term: the
    merge's own combination of the kept changes, shrunk where the base's importance
    outweighs the fine-tunes'."""
    total = kept_mass + weight * base
    return torch.where(kept_mass > 0, kept_mass / total, torch.ones_like(total))


# ------------------------------------------------------------------ pre-merge checks


def settings_of(parameters: dict) -> LrpSettings:
    return settings_from(LrpSettings, parameters)


def reads_files(settings: LrpSettings) -> bool:
    return True


def check_model(settings: LrpSettings, model, parameters: dict) -> None:
    settings.check_model(model, parameters["weight"], parameters["density"])


def check_tensor(settings: LrpSettings, weight, inputs, base) -> None:
    """Every score file the kernel will read for ``weight``: fingerprint, mode, budget,
    and the scores' presence and shape where the tensor is not kept whole; with
    ``base_scores``, the base's file the same way against the base (``base``)."""
    read = [
        planned for planned in inputs
        if not settings.keeps_whole(weight.name, len(planned.shape),
                                    planned.parameters["density"], weight.vocabulary_axis)
    ]  # fmt: skip
    if settings.base_scores and read and base is not None:
        path = score_path(settings.base_scores)
        reader = base.score_file(path)
        member = base_member(base.model)
        check_mode(reader, "scores" if settings.importance == "scores" else "weight", member)
        locate_scores(member, weight.name, path, "error").check(base.shape)
    for planned in inputs:
        path = score_path(planned.parameters["lrp_scores"])
        reader = planned.score_file(path)
        if reader is not None:
            check_mode(reader, settings.importance, planned.model)
            check_budget(reader, settings.budget, planned.model)
        density = planned.parameters["density"]
        if settings.keeps_whole(weight.name, len(planned.shape), density, weight.vocabulary_axis):
            continue
        scores = locate_scores(planned.model, weight.name, path, settings.missing_scores)
        scores.check(planned.shape)


# ------------------------------------------------------------------ model card


def describe(card, p: dict) -> str:
    """How the weights were chosen, in words that follow the resolved settings ``p``;
    ``card`` answers what the config says (:class:`..model_card.CardFacts`)."""
    density = card.one("density", "`density`")
    signals = card.signals()
    importance = {
        "delta": f"the size of the change weighted by {signals}",
        "weight": f"the size of the fine-tuned weight weighted by {signals}",
        "scores": f"{signals} alone",
    }.get(str(p.get("importance")), str(p.get("importance")))
    if p.get("selection") == "stochastic":
        spread = "`epsilon`" if "epsilon" in p else "the default spread ε"
        chosen = (
            f"; each entry was kept with a probability that rises with its rank, {density} "
            f"on average (± {spread}), and divided by that probability (the draw seeded by "
            f"seed {card.provenance.seed})"
        )
    else:
        chosen = f" and kept the {density} of its entries of highest importance"
        if p.get("rescale") is True:
            chosen += ", divided by the density"
        elif p.get("rescale") == "mass":
            chosen += ", divided by the kept share of importance mass"
    budget = {
        "layer": " (the density holds per layer, shared among its tensors by score mass)",
        "model": " (the density holds for the whole model, shared by score mass)",
    }.get(str(p.get("budget")), "")
    protect = (
        " Norms, biases, embeddings and output heads were kept whole."
        if p.get("protect_special")
        else ""
    )
    consensus = {
        "priority": "Where kept entries of several fine-tunes disagree in sign, the "
        "first-listed fine-tune that kept the entry wins and those agreeing with it stay.",
        "none": "The fine-tunes' kept entries were added.",
        "sum": "Where they disagree in sign, TIES' sign election (by summed values) decides.",
        "count": "Where they disagree in sign, TIES' sign election (by count) decides.",
        "relevance": "Where they disagree in sign, the sign of the importance-weighted sum "
        "wins.",
        "winner": "Where they disagree in sign, only the most important entry stays.",
        "drop": "Where they disagree in sign, the entry is dropped.",
        "unit": "Where they disagree in sign, in each output row the fine-tune with the most "
        "mass there wins and those agreeing with it stay.",
    }.get(str(p.get("consensus")), "")
    normalize = (
        " Each entry was divided by the summed weights of the fine-tunes that kept it "
        "(agreeing entries averaged)."
        if p.get("normalize")
        else " The weighted entries were added to the base."
    )
    held = (
        " Each entry's merged change was then shrunk by A / (A + w·b), A the fine-tunes' "
        "kept importance there and b the base's own (`base_scores`), "
        f"w = {p.get('base_weight')}, to keep what the base relies on."
        if p.get("base_scores")
        else ""
    )
    return (
        f"Each fine-tune's task vector (its weights minus the base's) was ranked by "
        f"{importance}{budget}{chosen}.{protect} {consensus}{normalize}{held}"
    )

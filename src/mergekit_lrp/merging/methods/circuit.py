"""Circuit-Merge, as a registered mergekit method: ``circuit``.

Models are merged in priority order: the first listed has the highest priority. Each
model's delta is cut to its meaningful changes (|delta| >= ``meaningful_change_threshold``)
and pruned DELLA-style (:func:`~.selection.keep_probabilities`: entries kept with a
probability that rises with their rank, by |delta| or, with ``drop_order: scores``, by the
model's ``lrp_scores`` importance), at a drop rate that falls with priority:

    keep(i) = (1 - T) * 0.5 ** (n - max(i, 2) + 1) * 2 * (1 - b) + T * (1 - b),  b = base_droprate

for the i-th model processed (i = 1 the lowest priority, the last listed; n models;
T = ``temperature``), and 2 * base_droprate dropped for a single model, as Circuit-Merge
defines it. (Circuit-Merge's description says i = 1 is the highest priority, but then
higher priority would drop more, the opposite of what it promises; i counts processing
order here.)
Kept entries are divided by their keep probability unless ``rescale: false``.

The pruned deltas are accumulated from the lowest priority up. An entry's first
contribution is taken as it is; a later one with the opposite sign overwrites it (the
higher priority wins the conflict); one with the same sign moves the accumulated value
towards itself by alpha = (1 - T) * 0.5 + T / (c + 1), c the entry's contributions so far:
at T = 0 earlier contributions decay geometrically, at T = 1 it is their plain average
(Circuit-Merge names both ends, not the formula between them: docs/method.md).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.parameters import (
    DROP_ORDERS,
    LRPConfigError,
    check_choice,
    score_path,
    settings_from,
)
from mergekit_lrp.merging.selection import draw, generator_for, keep_probabilities
from mergekit_lrp.merging.tensor_scores import (
    importance_of,
    locate_scores,
    open_scores,
    require_per_entry_scores,
)

NAME = "circuit"


@dataclass(frozen=True)
class CircuitSettings:
    """circuit's global parameters: the one place their defaults live."""

    temperature: float = 0.0
    base_droprate: float = 0.5
    meaningful_change_threshold: float = 2e-6
    epsilon: float = 0.0
    rescale: bool = True
    drop_order: str = "magnitude"

    def __post_init__(self):
        if not 0 <= self.temperature <= 1:
            raise LRPConfigError(f"circuit: temperature must be in [0, 1], got {self.temperature}")
        if not 0 <= self.base_droprate < 1:
            raise LRPConfigError(
                f"circuit: base_droprate must be in [0, 1), got {self.base_droprate}"
            )
        if self.meaningful_change_threshold < 0 or self.epsilon < 0:
            raise LRPConfigError("circuit: meaningful_change_threshold and epsilon must be >= 0")
        check_choice(NAME, "drop_order", self.drop_order, DROP_ORDERS)


DEFAULTS = CircuitSettings()


def keep_rate(position: int, count: int, temperature: float, base_droprate: float) -> float:
    """1 - drop rate of the ``position``-th model processed (1 = lowest priority)."""
    if count == 1:
        return max(0.0, 1.0 - 2 * base_droprate)
    divisions = count - max(position, 2) + 1
    decay = 0.5**divisions * 2 * (1 - base_droprate)
    return (1 - temperature) * decay + temperature * (1 - base_droprate)


@merge_method(
    name=NAME,
    pretty_name="Circuit-Merge (priority-ordered DELLA-style drops, sign conflicts to priority)",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def circuit_merge(
    group: TensorGroup,
    lrp_scores: PerNonBase[str | None] = None,
    temperature: float = DEFAULTS.temperature,
    base_droprate: float = DEFAULTS.base_droprate,
    meaningful_change_threshold: float = DEFAULTS.meaningful_change_threshold,
    epsilon: float = DEFAULTS.epsilon,
    rescale: bool = DEFAULTS.rescale,
    drop_order: str = DEFAULTS.drop_order,
) -> torch.Tensor:
    CircuitSettings(
        temperature=temperature, base_droprate=base_droprate,
        meaningful_change_threshold=meaningful_change_threshold, epsilon=epsilon,
        rescale=rescale, drop_order=drop_order,
    )  # fmt: skip
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    models = list(group.non_base)
    pruned = []
    for position, entry in enumerate(reversed(models), start=1):  # lowest priority first
        delta = (entry.tensor - base).float()
        delta = torch.where(delta.abs() >= meaningful_change_threshold, delta, 0)
        keep = keep_rate(position, len(models), temperature, base_droprate)
        # at most half the keep and the drop rate: no entry's probability is 0 (the 1/p
        # rescale would divide by it) or 1
        spread = min(epsilon, keep / 2, (1 - keep) / 2)
        importance = None  # |delta| ranks nothing at spread 0; score files are always read
        if drop_order == "scores" or (0 < keep < 1 and spread > 0):
            importance = _importance(entry.id, entry.tensor, delta, name, lrp_scores, drop_order)
        pruned.append(_prune(delta, importance, keep, spread, rescale, name, entry.id))
    return (base + accumulate(pruned, temperature)).to(base.dtype)


def accumulate(pruned: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Combine pruned deltas given lowest priority first (see the module doc); the
    tensors in ``pruned`` are overwritten."""
    # the first model's entries are all first contributions: kept as they are (+ 0.0
    # turns a dropped entry's -0.0 into 0.0)
    accumulated = pruned[0].add_(0.0)
    contributions = (accumulated != 0).int()
    for delta in pruned[1:]:
        present = delta != 0
        fresh = contributions == 0
        opposite = torch.sign(delta) != torch.sign(accumulated)
        take = present & (fresh | opposite)  # a first contribution, or a conflict
        agree = present & ~fresh & ~opposite
        conflict = present & ~fresh & opposite
        if temperature == 0:  # one alpha for every entry
            alpha = 0.5
        else:
            alpha = (1 - temperature) * 0.5 + temperature / (contributions.float() + 1)
        moved = delta.sub(accumulated).mul_(alpha).add_(accumulated)
        accumulated = torch.where(agree, moved, torch.where(take, delta, accumulated))
        contributions = torch.where(conflict, 1, contributions + present.int())
    return accumulated


def _importance(model: Hashable, theta, delta, name, lrp_scores, drop_order) -> torch.Tensor:
    if drop_order == "magnitude":
        return delta.abs()
    path = score_path(lrp_scores.get(model))
    if path:
        require_per_entry_scores(open_scores(path), "circuit's drop_order: scores", model)
    scores = locate_scores(model, name, path, "error")
    return importance_of(scores, theta, delta, "delta")


def _prune(delta, importance, keep, epsilon, rescale, name, model) -> torch.Tensor:
    """``delta`` (overwritten) pruned at ``keep`` with spread ``epsilon``."""
    if keep >= 1:
        return delta
    if keep <= 0:
        return torch.zeros_like(delta)
    if epsilon > 0:
        probability = keep_probabilities(importance, keep, epsilon)
    else:  # one probability: a scalar, as a float32 tensor of it would be
        probability = torch.tensor(keep, dtype=torch.float32, device=delta.device)
    generator = generator_for(name, model, delta.device)
    mask = draw(probability.expand(delta.shape), generator)
    delta.mul_(mask)
    return delta.div_(probability) if rescale else delta


# ------------------------------------------------------------------ pre-merge checks


def settings_of(parameters: dict) -> CircuitSettings:
    return settings_from(CircuitSettings, parameters)


def reads_files(settings: CircuitSettings) -> bool:
    """Only ``drop_order: scores`` reads score files."""
    return settings.drop_order == "scores"


def check_model(settings: CircuitSettings, model, parameters: dict) -> None:
    """circuit takes no per-model values but ``lrp_scores``."""


def check_tensor(settings: CircuitSettings, weight, inputs, base) -> None:
    """With ``drop_order: scores``, every model's score file as for ``lrp``."""
    for planned in inputs:
        path = score_path(planned.parameters["lrp_scores"])
        if not path:
            raise LRPConfigError(
                f"circuit: drop_order: scores needs an lrp_scores file for model {planned.model}"
            )
        reader = planned.score_file(path)
        require_per_entry_scores(reader, "circuit's drop_order: scores", planned.model)
        locate_scores(planned.model, weight.name, str(path), "error").check(planned.shape)


# ------------------------------------------------------------------ model card


def describe(card, p: dict) -> str:
    order = (
        "by the size of the change weighted by " + card.signals()
        if p.get("drop_order") == "scores"
        else "by the size of the change"
    )
    rescale = ", divided by their keep probability" if p.get("rescale") else ""
    return (
        "The models were merged in priority order, the first listed highest. Each model's "
        f"changes of at least {p.get('meaningful_change_threshold')} were kept at a rate "
        f"that falls with priority (base drop rate {p.get('base_droprate')}, temperature "
        f"{p.get('temperature')}), drawn by rank {order} (spread {p.get('epsilon')}; seed "
        f"{card.provenance.seed}){rescale}. Where models disagree in sign, the higher priority "
        "wins; agreeing changes are blended."
    )

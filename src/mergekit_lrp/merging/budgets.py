"""Budgets beyond one tensor: per-tensor densities from a model's whole score file.

With ``budget: layer`` (or ``model``), the entries kept in a layer (or the whole model)
add up to ``density`` times its entries, shared among its tensors in proportion to
their relevance mass, numel × mean score, so that important tensors keep more entries than
unimportant ones at the same total density. A tensor's share is capped at all of its
entries; the excess goes to the others (water-filling). Within a tensor the top-k by
importance is unchanged.

The shares come from the score file alone (one read of each score tensor, once per
version of the file and density), not from the weights. Protected tensors (1-D,
embeddings and output heads: :func:`.tensor_names.is_protected`) take no part; a tensor
the file does not store under its own name (fused MoE experts) keeps the plain density.
A layer is named with its stack (:func:`.tensor_names.layer_of`), so an MTP or vision
layer is not pooled with the decoder layer of the same index.
"""

from __future__ import annotations

from functools import lru_cache

from mergekit_lrp.merging.parameters import LRPConfigError
from mergekit_lrp.merging.tensor_names import is_protected, layer_of
from mergekit_lrp.merging.tensor_scores import open_scores
from mergekit_lrp.scores.file import ScoreReader


def budget_density(path: str, name: str, density: float, budget: str) -> float:
    """The density tensor ``name`` gets under ``budget``."""
    if budget == "tensor":
        return density
    reader = open_scores(str(path))
    check_budget(reader, budget)
    return _densities(reader, density, budget).get(name, density)


def check_budget(reader: ScoreReader, budget: str, model=None) -> None:
    """A Gram file has no score per entry to share a budget by: refuse a layer or model
    budget with one."""
    if budget != "tensor" and reader.is_gram:
        who = f" (model {model})" if model is not None else ""
        raise LRPConfigError(
            f"lrp: budget: {budget} shares density by the score file's score mass, but "
            f"{reader.path}{who} is a Gram file, which has none; use budget: tensor with it"
        )


def group_of(name: str, budget: str) -> str:
    if budget == "model":
        return "model"
    return layer_of(name) or "outside the layers"


@lru_cache(maxsize=32)
def _densities(reader: ScoreReader, density: float, budget: str) -> dict[str, float]:
    """Keyed by the reader, which :func:`.tensor_scores.open_scores` renews when the file
    changes: a score file rewritten in the same process gets new shares."""
    groups: dict[str, dict[str, tuple[int, float]]] = {}
    for name in sorted(reader.names()):
        if is_protected(name, len(reader.shape(name))):
            continue
        scores = reader.get(name)
        groups.setdefault(group_of(name, budget), {})[name] = (scores.numel(), float(scores.sum()))
    densities = {}
    for members in groups.values():
        densities.update(allocate(members, density))
    return densities


def allocate(members: dict[str, tuple[int, float]], density: float) -> dict[str, float]:
    """Densities for tensors given as name -> (numel, relevance mass): kept entries
    proportional to mass, each at most its numel, summing to density × total numel."""
    remaining = density * sum(n for n, _ in members.values())
    open_ = dict(members)
    result = {}
    while open_:
        mass = sum(m for _, m in open_.values())
        if mass <= 0:  # no relevance left to share by: the plain density for the rest
            share = remaining / sum(n for n, _ in open_.values())
            result.update({name: min(1.0, share) for name in open_})
            break
        full = {name for name, (n, m) in open_.items() if remaining * m / mass >= n}
        if not full:
            result.update({name: remaining * m / mass / n for name, (n, m) in open_.items()})
            break
        for name in full:
            result[name] = 1.0
            remaining -= open_.pop(name)[0]
    return {name: max(value, 1e-9) for name, value in result.items()}


def forget_budgets() -> None:
    """Drop the cached shares (the end of a merge)."""
    _densities.cache_clear()

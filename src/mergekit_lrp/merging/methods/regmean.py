"""RegMean, as a registered mergekit method: ``regmean``.

Every linear weight that the models' Gram files cover (``lrp-compute --method gram``) is
merged as the least-squares fit to all models' outputs on their own calibration inputs,
in closed form (:func:`..gram_solve.solve`):

    W = W_base + (sum_i (W_i - W_base) G~_i) (sum_i G~_i + lambda I)^-1
    G~_i = weight_i * (alpha * G_i + (1 - alpha) * diag(G_i))

(Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023;
at ridge 0 the base cancels and this is their formula). With ``base_scores`` (the base
model's own Gram file, e.g. from general prompts) the base joins the solve as one more
member whose change is zero, weighted by ``base_weight``: its term adds
base_weight * G~_base to the denominator only, so the merge keeps the base's outputs on
those inputs in proportion (docs/method.md). The other tensors (embeddings,
norms, biases, and anything no Gram file covers) are merged by ``other_tensors``:
``average`` (sum_i weight_i * theta_i / sum_i weight_i, RegMean's own rule for them) or
``task_arithmetic`` (theta_base + sum_i weight_i * (theta_i - theta_base)).

mergekit calls the method one tensor at a time; each model's Gram matrix of that tensor's
input is read from its file then, one model at a time, and the factorization of the
summed matrices is kept from the first weight that reads that input to the last (q/k/v and
gate/up share one) and never beyond the layer, so memory holds one layer's statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.gram_solve import (
    DEFAULT_ALPHA,
    DEFAULT_RIDGE,
    check_gram_shape,
    gram_reader,
    layer_pattern,
    resolve_dtype,
    sharing_weights,
    solve,
    solves,
)
from mergekit_lrp.merging.low_rank_solve import solve_low_rank, uses_low_rank
from mergekit_lrp.merging.parameters import (
    OTHER_TENSOR_RULES,
    REGMEAN_MISSING_MODES,
    SOLVE_DTYPES,
    LRPConfigError,
    base_member,
    check_base_weight,
    check_choice,
    score_path,
    settings_from,
)
from mergekit_lrp.merging.tensor_scores import open_scores

NAME = "regmean"


@dataclass(frozen=True)
class RegmeanSettings:
    """regmean's global parameters: the one place their defaults live."""

    alpha: float = DEFAULT_ALPHA
    ridge: float = DEFAULT_RIDGE
    other_tensors: str = "average"
    missing_scores: str = "error"
    solve_dtype: str = "auto"
    #: the base model's Gram file: the base joins the solve with ``base_weight``
    base_scores: str | None = None
    base_weight: float = 1.0

    def __post_init__(self):
        check_base_weight(NAME, self.base_scores, self.base_weight)
        if not 0 <= self.alpha <= 1:
            raise LRPConfigError(f"regmean: alpha must be in [0, 1], got {self.alpha}")
        if not self.ridge >= 0:  # also refuses NaN
            raise LRPConfigError(f"regmean: ridge must be >= 0, got {self.ridge}")
        check_choice(NAME, "other_tensors", self.other_tensors, OTHER_TENSOR_RULES)
        check_choice(NAME, "missing_scores", self.missing_scores, REGMEAN_MISSING_MODES)
        check_choice(NAME, "solve_dtype", self.solve_dtype, SOLVE_DTYPES)


DEFAULTS = RegmeanSettings()


def check_weight(model, weight: float) -> None:
    if not weight > 0:
        raise LRPConfigError(
            f"regmean: weight for {model} must be positive, got {weight} (it scales the "
            "model's Gram matrices; leave a model out of models: to drop it)"
        )


@merge_method(
    name=NAME,
    pretty_name="RegMean (least-squares merge of linear layers from input Gram matrices)",
    reference_url="https://arxiv.org/abs/2212.09849",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def regmean_merge(
    group: TensorGroup,
    lrp_scores: PerNonBase[str | None] = None,
    weight: PerNonBase[float] = 1.0,
    alpha: float = DEFAULTS.alpha,
    ridge: float = DEFAULTS.ridge,
    other_tensors: str = DEFAULTS.other_tensors,
    missing_scores: str = DEFAULTS.missing_scores,
    solve_dtype: str = DEFAULTS.solve_dtype,
    base_scores: str | None = DEFAULTS.base_scores,
    base_weight: float = DEFAULTS.base_weight,
) -> torch.Tensor:
    RegmeanSettings(
        alpha=alpha, ridge=ridge, other_tensors=other_tensors, missing_scores=missing_scores,
        solve_dtype=solve_dtype, base_scores=base_scores, base_weight=base_weight,
    )  # fmt: skip
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    models = list(group.non_base)
    if not models:
        return base
    for entry in models:
        check_weight(entry.id, weight[entry.id])
    ids = [entry.id for entry in models]
    paths = [score_path(lrp_scores.get(model)) for model in ids]
    readers = [gram_reader(m, path, open_scores) for m, path in zip(ids, paths, strict=True)]
    weights = [float(weight[model]) for model in ids]
    thetas = [entry.tensor for entry in models]
    if not solves(name, ids, readers, missing_scores):
        return merge_other(base, thetas, weights, other_tensors)
    if base_scores:  # the base as one more member: zero change, its Gram matrices weighted
        member = base_member(group.base.id)
        ids = [*ids, member]
        readers = [*readers, gram_reader(member, score_path(base_scores), open_scores)]
        if not solves(name, ids, readers, missing_scores):  # the base's file lacks it
            return merge_other(base, thetas, weights, other_tensors)
        thetas, weights = [*thetas, base], [*weights, float(base_weight)]
    for reader in readers:
        check_gram_shape(reader, name, tuple(base.shape))
    dtype = resolve_dtype(solve_dtype, base.device)
    key = (
        tuple((str(r.path), r.gram_name(name), w) for r, w in zip(readers, weights, strict=True)),
        alpha,
        ridge,
        dtype,
        str(base.device),
    )
    forms = [r.metadata.gram_factored.get(r.gram_name(name)) for r in readers]
    low_rank = uses_low_rank(forms, base.shape[1])
    return (solve_low_rank if low_rank else solve)(
        base,
        thetas,
        [(lambda r=r: r.factored_gram(name)) if low_rank else (lambda r=r: r.gram(name))
         for r in readers],  # fmt: skip
        weights,
        alpha,
        ridge,
        dtype,
        where=f"{readers[0].gram_name(name)!r} of {name!r} "
        f"({', '.join(str(r.path) for r in readers)})",
        key=key,
        name=name,
        users=sharing_weights(readers, name),
    )


def merge_other(base, thetas, weights, rule: str) -> torch.Tensor:
    """A tensor without Gram matrices: the weighted average of the models, or task
    arithmetic over the base."""
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for theta, weight in zip(thetas, weights, strict=True):
        if rule == "average":
            total.add_(theta.float(), alpha=weight)
        else:
            total.add_(theta.float() - base.float(), alpha=weight)
    if rule == "average":
        return (total / sum(weights)).to(base.dtype)
    return (base.float() + total).to(base.dtype)


# ------------------------------------------------------------------ pre-merge checks


def settings_of(parameters: dict) -> RegmeanSettings:
    return settings_from(RegmeanSettings, parameters)


def reads_files(settings: RegmeanSettings) -> bool:
    return True


def check_model(settings: RegmeanSettings, model, parameters: dict) -> None:
    check_weight(model, parameters["weight"])


def check_tensor(settings: RegmeanSettings, weight, inputs, base) -> None:
    """Every model's Gram file (a Gram file, of that checkpoint), and where ``weight`` is
    solved, each model's Gram matrix of its input ([in, in] for its in-features); with
    ``base_scores``, the base's file the same way against the base (``base``)."""
    ids, readers = [], []
    for planned in inputs:
        path = score_path(planned.parameters["lrp_scores"])
        gram_reader(planned.model, path, open_scores)
        ids.append(planned.model)
        readers.append(planned.score_file(path))
    if not readers or not solves(weight.name, ids, readers, settings.missing_scores):
        return
    if settings.base_scores:
        member = base_member(base.model)
        path = score_path(settings.base_scores)
        gram_reader(member, path, open_scores)
        ids.append(member)
        readers.append(base.score_file(path))
        inputs = [*inputs, base]
        solves(weight.name, ids, readers, "error")  # the base's file covers what is solved
    for reader, planned in zip(readers, inputs, strict=True):
        check_gram_shape(reader, weight.name, planned.shape)
    check_calibration_size(settings, weight.name, readers, inputs[0].shape[1])


#: layers already warned about in this process (one line per module, not per layer)
_WARNED: set[str] = set()


def check_calibration_size(settings: RegmeanSettings, name: str, readers, features: int) -> None:
    """With no ridge, a layer whose Gram files hold fewer calibration tokens in all than it
    has input features has a singular summed matrix: refused when alpha is 1 (nothing
    else makes it solvable), else said once per module (alpha's diagonal term carries the
    solve in the directions no token reached)."""
    tokens = sum(reader.metadata.num_tokens for reader in readers)
    if settings.ridge > 0 or tokens >= features:
        return
    where = (
        f"regmean: {name}: the Gram files hold {tokens} calibration tokens in all, fewer "
        f"than its {features} input features, and ridge is 0, so the summed matrix has rank "
        f"at most {tokens}"
    )
    if settings.alpha == 1:
        raise LRPConfigError(
            f"{where} and alpha 1 adds no diagonal: it cannot be solved. Set ridge (default "
            f"{DEFAULT_RIDGE:g}) or alpha below 1, or give more calibration prompts"
        )
    pattern = layer_pattern(name)
    if pattern not in _WARNED:
        _WARNED.add(pattern)
        warnings.warn(
            f"{where}; the solve uses ridge 0 and alpha {settings.alpha:g}, so only the "
            f"(1 - alpha) diagonal term holds the directions no token reached. Set ridge "
            f"(default {DEFAULT_RIDGE:g}) or give more calibration prompts",
            stacklevel=2,
        )


# ------------------------------------------------------------------ model card


def describe(card, p: dict) -> str:
    alpha, ridge = p.get("alpha"), p.get("ridge")
    other = {
        "average": "the weighted average of the fine-tunes",
        "task_arithmetic": "task arithmetic (the base plus the weighted sum of the "
        "fine-tunes' changes)",
    }.get(str(p.get("other_tensors")), str(p.get("other_tensors")))
    weights = card.values("weight")
    weighted = "" if weights == [1.0] else ", each scaled by its model's `weight`"
    missing = (
        " Linear weights a Gram file lacked were merged like the other tensors."
        if p.get("missing_scores") == "other_tensors"
        else ""
    )
    solve_dtype = str(p.get("solve_dtype"))
    device = card.provenance.device
    dtype = str(resolve_dtype(solve_dtype, device)).removeprefix("torch.")
    if solve_dtype == "auto":
        dtype += f" (`solve_dtype: auto` on {device})"
    held = (
        f" The base joined the solve as one more member with no change, its own Gram "
        f"matrices (`base_scores`) weighted {p.get('base_weight')}, so the merge also fits "
        "the base's outputs on the base's inputs."
        if p.get("base_scores")
        else ""
    )
    return (
        "Each linear layer was solved in closed form (RegMean) as the weight whose outputs "
        "best fit every fine-tune's outputs on its own calibration inputs: the fine-tunes' "
        "changes weighted by the Gram matrices of their layer inputs (from `lrp-compute "
        f"--method gram`){weighted}, off-diagonal entries scaled by alpha = {alpha}, with "
        f"a ridge of {ridge} times the mean diagonal pulling the change towards the base, "
        f"solved in {dtype}.{held} The other tensors (embeddings, norms, biases) are "
        f"{other}.{missing}"
    )

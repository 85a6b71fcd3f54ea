"""RegMean, as a registered mergekit method: ``regmean``.

Every linear weight that the models' Gram files cover (``lrp-compute --method gram``) is
merged as the least-squares fit to all models' outputs on their own calibration inputs,
in closed form (:func:`.gram.solve`):

    W = W_base + (sum_i (W_i - W_base) G~_i) (sum_i G~_i + lambda I)^-1
    G~_i = weight_i * (alpha * G_i + (1 - alpha) * diag(G_i))

(Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023;
at ridge 0 the base cancels and this is their formula). The other tensors (embeddings,
norms, biases, and anything no Gram file covers) are merged by ``other_tensors``:
``average`` (sum_i weight_i * theta_i / sum_i weight_i, RegMean's own rule for them) or
``task_arithmetic`` (theta_base + sum_i weight_i * (theta_i - theta_base)).

mergekit calls the method one tensor at a time; each model's Gram matrix of that tensor's
input is read from its file then, one model at a time, and the factorization of the
summed matrices is kept from the first weight that reads that input to the last (q/k/v and
gate/up share one) and never beyond the layer, so memory holds one layer's statistics.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.gram import (
    DEFAULT_ALPHA,
    DEFAULT_RIDGE,
    check_gram_shape,
    gram_reader,
    resolve_dtype,
    sharing_weights,
    solve,
    solves,
)
from mergekit_lrp.merging.parameters import (
    check_regmean_parameters,
    check_regmean_weight,
    score_path,
)
from mergekit_lrp.merging.tensor_scores import open_scores


@merge_method(
    name="regmean",
    pretty_name="RegMean (least-squares merge of linear layers from input Gram matrices)",
    reference_url="https://arxiv.org/abs/2212.09849",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def regmean_merge(
    group: TensorGroup,
    lrp_scores: PerNonBase[str | None] = None,
    weight: PerNonBase[float] = 1.0,
    alpha: float = DEFAULT_ALPHA,
    ridge: float = DEFAULT_RIDGE,
    other_tensors: str = "average",
    missing_scores: str = "error",
    solve_dtype: str = "auto",
) -> torch.Tensor:
    check_regmean_parameters(alpha, ridge, other_tensors, missing_scores, solve_dtype)
    base = group.base.tensor
    name = group.metadata.name or "<unnamed tensor>"
    models = list(group.non_base)
    if not models:
        return base
    for entry in models:
        check_regmean_weight(entry.id, weight[entry.id])
    ids = [entry.id for entry in models]
    paths = [score_path(lrp_scores.get(model)) for model in ids]
    readers = [gram_reader(m, path, open_scores) for m, path in zip(ids, paths, strict=True)]
    weights = [float(weight[model]) for model in ids]
    if solves(name, ids, readers, missing_scores):
        for reader in readers:
            check_gram_shape(reader, name, tuple(base.shape))
        dtype = resolve_dtype(solve_dtype, base.device)
        key = (
            tuple(
                (str(r.path), r.gram_name(name), w) for r, w in zip(readers, weights, strict=True)
            ),
            alpha,
            ridge,
            dtype,
            str(base.device),
        )
        return solve(
            base,
            [entry.tensor for entry in models],
            [lambda r=r: r.gram(name) for r in readers],
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
    return merge_other(base, [entry.tensor for entry in models], weights, other_tensors)


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

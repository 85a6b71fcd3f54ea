"""WUDI, in closed form (Cheng et al., "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", ICML 2025, arXiv 2503.08099).

WUDI fits the merged change of each layer matrix to every fine-tune's change on the rows
of that fine-tune's own task vector, which stand in for its inputs (the paper shows they
span them): minimise sum_i ||(delta - delta_i) G_i^(1/2)||^2 with
G_i = weight_i * delta_i^T delta_i / ||delta_i||_F^2. This is RegMean's objective with G_i
in place of the inputs' Gram matrix, so it is solved in closed form by this package's
RegMean solve (ridge :data:`RIDGE` times the mean diagonal, small enough to leave the
objective's minimum in place; the paper runs gradient steps from task arithmetic
instead). Other tensors: the weighted mean of
the changes.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from mergekit_lrp.merging.gram_solve import solve
from peers.task_vectors import merge_tensor

RIDGE = 1e-4


def wudi_change(
    base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float], name: str
) -> torch.Tensor:
    grams = [lambda d=d: d.T @ d / d.square().sum().clamp_min(1e-30) for d in deltas]
    thetas = [base + d for d in deltas]
    where = f"wudi on {name!r}"
    merged = solve(base, thetas, grams, weights, 1.0, RIDGE, torch.float64, where)
    return merged - base


@merge_method(
    name="wudi",
    pretty_name="WUDI (task vectors as their own inputs, closed form)",
    reference_url="https://arxiv.org/abs/2503.08099",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def wudi_merge(group: TensorGroup, weight: PerNonBase[float] = 1.0) -> torch.Tensor:
    return merge_tensor(group, weight, wudi_change)

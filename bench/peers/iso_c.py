"""Iso-C: isotropic merging in the common subspace (Marczak et al., "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv
2502.04959).

Per layer matrix, the summed change sum_i weight_i * delta_i = U S V^T keeps its singular
directions and gets a flat spectrum: delta = mean(S) U V^T, so no task's dominant
directions drown the others'. Other tensors: the weighted mean of the changes. The paper
scales the result by a factor chosen on validation data; here that factor is the models'
common ``weight`` (1: the unscaled form).
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from peers.task_vectors import merge_tensor


def isotropic_change(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    summed = sum(w * d for w, d in zip(weights, deltas, strict=True))
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    return s.mean() * (u @ vh)


@merge_method(
    name="iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    reference_url="https://arxiv.org/abs/2502.04959",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def iso_c_merge(group: TensorGroup, weight: PerNonBase[float] = 1.0) -> torch.Tensor:
    return merge_tensor(
        group, weight, lambda _, deltas, weights, __: isotropic_change(deltas, weights)
    )

"""TSV-M: task singular vectors, merged (Gargiulo et al., "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025, arXiv 2412.00081).

Per layer matrix, each fine-tune's change is cut to its top 1/N singular directions
(N fine-tunes); the kept left and the kept right singular vectors of all fine-tunes are
each replaced by the nearest orthonormal set (the polar factor of their concatenation),
which removes the overlap between tasks' directions, and the change is rebuilt with the
kept singular values: delta = U_perp diag(weight_i * S_i) V_perp^T. Other tensors: the
weighted mean of the changes. The paper's setting is weight 1 for every model.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, PerNonBase, TensorGroup
from mergekit.merge_methods.easy_define import merge_method

from peers.task_vectors import merge_tensor


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest ``matrix`` (columns): U V^T of its SVD."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh


def tsv_change(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    keep = max(1, min(deltas[0].shape) // len(deltas))
    us, ss, vs = [], [], []
    for delta, weight in zip(deltas, weights, strict=True):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :keep])
        ss.append(weight * s[:keep])
        vs.append(vh[:keep].T)
    u, v = polar_factor(torch.cat(us, dim=1)), polar_factor(torch.cat(vs, dim=1))
    return (u * torch.cat(ss)) @ v.T


@merge_method(
    name="tsv_m",
    pretty_name="TSV-M (task singular vectors, merged)",
    reference_url="https://arxiv.org/abs/2412.00081",
    contract=InputContract(base=BasePolicy.REQUIRED),
)
def tsv_m_merge(group: TensorGroup, weight: PerNonBase[float] = 1.0) -> torch.Tensor:
    return merge_tensor(group, weight, lambda _, deltas, weights, __: tsv_change(deltas, weights))

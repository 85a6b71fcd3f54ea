"""Exact top-k masks without sorting whole tensors."""

from __future__ import annotations

import torch


def top_k_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly ``k`` entries of highest importance.

    The threshold comes from a selection (``kthvalue``), not a sort. Entries tied
    at the threshold are kept in flat-index order, so the mask is deterministic.
    """
    flat = importance.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(importance, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(importance, dtype=torch.bool)
    threshold = torch.kthvalue(flat.float(), n - k + 1).values.to(flat.dtype)
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        tied = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[tied] = True
    return mask.reshape(importance.shape)


def kept_count(density: float, numel: int) -> int:
    """k = round(density * numel): the number of entries a density keeps."""
    return int(round(density * numel))

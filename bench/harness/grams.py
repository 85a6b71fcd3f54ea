"""Exact Gram matrices of every nn.Linear's input by forward hooks, for the cost
benchmark's Gram files (:func:`harness.perf_models.gram_file`: random-token prompts, where
only the matrices' sizes matter). The quality benchmark's Gram files come from
``lrp-compute --method gram`` (:mod:`harness.score_sets`).
"""

from __future__ import annotations

import torch


def linear_input_grams(model, batches) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(stored name -> mean over ``batches`` of sum_t x_t x_t^T, weight -> stored name) for
    every nn.Linear of ``model``; each batch is one sequence of token ids [1, T]."""
    sums: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # input id -> (first reader, kept alive)

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            key = seen.setdefault(id(inputs[0]), (name, inputs[0]))[0]
            members = groups.setdefault(key, [])
            if name not in members:
                members.append(name)
            if key == name:
                if name in sums:
                    sums[name].addmm_(x.T, x)
                else:
                    sums[name] = x.T @ x

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        with torch.no_grad():
            for ids in batches:
                seen.clear()
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    tensors, gram_of = {}, {}
    for key, members in groups.items():
        weights = sorted(f"{m}.weight" for m in members)
        stored = weights[0].removesuffix(".weight") + ".input_gram"
        tensors[stored] = sums[key] / len(batches)
        gram_of.update({w: stored for w in weights})
    return tensors, gram_of

"""Score names as the checkpoint stores them: the names mergekit merges under.

transformers 5 may rename parameters on load (Qwen3.5's ``model.language_model.``
prefix) or fuse several checkpoint tensors into one parameter (MoE experts). A score
file must name each tensor as the checkpoint does, so these functions map parameters
back with transformers' own reverse conversion, the one ``save_pretrained`` applies.
"""

from __future__ import annotations

import torch

from mergekit_lrp.scoring.options import ComputeError


def checkpoint_names(
    model, tensor_files: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    """Map each (deduplicated) parameter to the checkpoint name(s) that store it.

    Returns (score name -> parameter name, alias -> score name, converted). A parameter
    named differently in the checkpoint (transformers 5 renames on load, e.g. Qwen3.5's
    ``model.language_model.`` prefix when the multimodal checkpoint is loaded as a causal
    LM) is mapped back with transformers' own reverse conversion, the one
    ``save_pretrained`` applies. A parameter stored as several checkpoint tensors (MoE
    experts fused on load) keeps its parameter name as score name and is listed in
    ``converted`` with its checkpoint names; :func:`checkpoint_layout` splits its scores.
    Aliases are the other names of tied parameters (e.g. ``lm_head.weight``).
    """
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    stored_to_param, aliases, converted = {}, {}, {}
    for name, parameter in model.named_parameters():
        group = names_of[id(parameter)]
        saved = {n: [n] if n in tensor_files else _saved_names(model, n, parameter) for n in group}
        stored = [n for n in group if all(s in tensor_files for s in saved[n])]
        if not stored:
            raise ComputeError(
                f"parameter {name!r} of the loaded model is not in the checkpoint's tensors; "
                "the score file could not name it as mergekit will"
            )
        if len(saved[stored[0]]) == 1:
            key = saved[stored[0]][0]
        else:
            key = name
            converted[key] = saved[stored[0]]
        stored_to_param[key] = name
        for other in group:
            alias = saved[other][0] if len(saved[other]) == 1 else other
            if other != stored[0] and alias != key:
                aliases[alias] = key
    return stored_to_param, aliases, converted


def _saved_names(model, name: str, parameter) -> list[str]:
    """The checkpoint name(s) transformers' ``save_pretrained`` would store ``name`` under."""
    from transformers.core_model_loading import revert_weight_conversion

    try:
        meta = torch.empty(parameter.shape, dtype=parameter.dtype, device="meta")
        return list(revert_weight_conversion(model, {name: meta})) or [name]
    except Exception:  # no usable conversion for this parameter: keep its own name
        return [name]


def checkpoint_layout(
    model, scores: dict[str, torch.Tensor], converted: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Split the scores of ``converted`` parameters into their checkpoint tensors.

    Uses transformers' reverse weight conversion on the score tensors, so every score
    entry lands where ``save_pretrained`` puts the weight entry it belongs to.
    """
    converted = {name: parts for name, parts in converted.items() if name in scores}
    if not converted:
        return scores
    from transformers.core_model_loading import revert_weight_conversion

    out = {name: value for name, value in scores.items() if name not in converted}
    split = revert_weight_conversion(model, {name: scores[name] for name in converted})
    expected = {s for names in converted.values() for s in names}
    if set(split) != expected:
        raise ComputeError(
            "transformers' reverse weight conversion gave other tensor names than the "
            f"checkpoint's ({sorted(set(split) ^ expected)[:3]})"
        )
    out.update({name: value.contiguous() for name, value in split.items()})
    return out

"""Gram files (quantity input_gram) for tests, from exact Gram matrices computed here: forward
hooks on every nn.Linear of a model, on a few token sequences. The format is the one
``lrp-compute --method gram`` writes (docs/score-format.md)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mergekit_lrp.scores.file import ScoreMetadata, write_scores
from mergekit_lrp.scores.fingerprint import model_fingerprint

#: token sequences within every tiny model's vocabulary
SEQUENCES = [
    [5, 17, 42, 8, 77, 23, 61, 30, 11, 64, 9, 33],
    [40, 2, 19, 88, 7, 51, 26, 70, 14, 99, 3, 45],
    [12, 60, 31, 84, 6, 29, 73, 18, 55, 37, 90, 21],
    [66, 15, 48, 4, 93, 27, 58, 10, 81, 35, 72, 44],
]


def exact_grams(model_dir: Path, sequences=SEQUENCES) -> tuple[dict, dict]:
    """(stored name -> mean over sequences of X^T X, weight name -> stored name) for every
    nn.Linear of the model; linear layers fed the same input tensor share one matrix,
    named after the first sorted weight of the group with ``.weight`` -> ``.input_gram``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    groups: dict[str, list[str]] = {}
    # id of an input tensor in this pass -> (first module's name, the tensor, kept alive
    # so that its id is not reused within the pass)
    seen: dict[int, tuple[str, torch.Tensor]] = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            key = seen.setdefault(id(inputs[0]), (name, inputs[0]))[0]
            groups.setdefault(key, [])
            if name not in groups[key]:
                groups[key].append(name)
            if key == name:
                sums[name] = sums.get(name, 0) + x.T @ x

        return record

    handles = [
        module.register_forward_pre_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]
    with torch.no_grad():
        for ids in sequences:
            seen.clear()
            model(torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    tensors, gram_of = {}, {}
    for key, members in groups.items():
        weights = sorted(f"{m}.weight" for m in members)
        stored = weights[0].removesuffix(".weight") + ".input_gram"
        tensors[stored] = (sums[key] / len(sequences)).float()
        gram_of.update({w: stored for w in weights})
    return tensors, gram_of


def gram_file(
    model_dir: Path,
    out: Path,
    sequences=SEQUENCES,
    tensors=None,
    drop=(),
    fingerprint=None,
    dtype=torch.float32,
) -> Path:
    """A valid Gram file of ``model_dir`` (exact Gram matrices on ``sequences``).

    ``tensors`` replaces stored matrices by name, ``drop`` removes weights from
    ``gram_of`` (a missing layer), ``fingerprint`` overrides the model's.
    """
    grams, gram_of = exact_grams(model_dir, sequences)
    grams.update(tensors or {})
    for weight in drop:
        del gram_of[weight]
    metadata = ScoreMetadata(
        model_fingerprint=fingerprint or model_fingerprint(model_dir),
        num_prompts=len(sequences),
        num_tokens=sum(len(s) for s in sequences),
        target="inputs",
        model_type="llama",
        method="gram",
        quantity="input_gram",
        gram_of=gram_of,
        extra={"token_weighting": "none"},
    )
    write_scores(out, grams, metadata, dtype=dtype)
    return out

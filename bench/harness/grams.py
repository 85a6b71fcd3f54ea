"""Gram files (quantity ``input_gram``, docs/score-format.md) for the benchmarks, computed
here while ``lrp-compute`` has no ``--method gram``: forward hooks on every nn.Linear, the
exact Gram matrix of its input over every token of each calibration text, averaged over
the texts, linear layers fed the same input sharing one matrix (q/k/v, gate/up).
:func:`harness.score_sets.compute_score_files` uses ``lrp-compute --method gram`` instead
as soon as it exists.
"""

from __future__ import annotations

from pathlib import Path

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


def gram_file(model_dir: Path, texts: list[str], out: Path, max_length: int = 512) -> Path:
    """The Gram file of ``model_dir`` on ``texts`` (each tokenized alone, every token
    weighted 1), written with the model's fingerprint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_lrp.scores.file import ScoreMetadata, write_scores
    from mergekit_lrp.scores.fingerprint import SCHEME, model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    batches = [
        torch.tensor([tokenizer(text)["input_ids"][:limit]]) for text in texts if text.strip()
    ]
    tensors, gram_of = linear_input_grams(model, batches)
    metadata = ScoreMetadata(
        model_fingerprint=model_fingerprint(model_dir),
        num_prompts=len(batches),
        num_tokens=sum(b.numel() for b in batches),
        target="inputs",
        model_type=model.config.model_type,
        method="gram",
        quantity="input_gram",
        fingerprint_scheme=SCHEME,
        gram_of=gram_of,
        extra={"token_weighting": "none", "max_length": str(limit), "model": str(model_dir)},
    )
    write_scores(out, tensors, metadata)
    return out

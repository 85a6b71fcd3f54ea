"""One backward pass of a prompt: forward, seed the target, one real backward, under
whatever rules are active (the AttnLRP rules for ``attnlrp``, none for ``gradient`` and
``fisher``), and the model prepared for it (:func:`backward_ready`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

#: what users choose with --target (fisher seeds "log-likelihood" itself)
TARGETS = ("predicted", "next-token")


@dataclass(frozen=True)
class PassResult:
    target: float  # the logit (sum) the backward pass was seeded from
    #: input embeddings x gradient (sum): the relevance reaching the input under the
    #: AttnLRP rules, which conserve the target (docs/attnlrp.md, "Conservation")
    input_relevance: float
    tokens: int


@contextlib.contextmanager
def backward_ready(
    model: torch.nn.Module, checkpointing: bool = True, parameter_grads: bool = True
):
    """Checkpointing on (unless told), KV cache and dropout off, every parameter requiring grad.

    Everything is restored on exit, so the model behaves as before afterwards. With
    ``checkpointing=False`` a model that already checkpoints keeps doing so.
    Train mode is needed because transformers only checkpoints while training;
    dropout modules are set to p=0 for the duration. With ``parameter_grads=False`` no
    parameter requires grad and the input embeddings' output does instead: the backward
    pass computes the gradients of activations only (what the Gram signals weight tokens
    with), none of the weights'.
    """
    was_training = model.training
    enable, disable, was_checkpointing = _checkpointing_api(model)
    configs = [c for c in (model.config, getattr(model.config, "text_config", None)) if c]
    use_cache = [getattr(c, "use_cache", None) for c in configs]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    restore = []
    try:
        for config in configs:
            config.use_cache = False
        for module, _ in dropouts:
            module.p = 0.0
        model.train()
        if checkpointing and not was_checkpointing:
            enable({"use_reentrant": False})
        for parameter, _ in requires_grad:
            parameter.requires_grad_(parameter_grads)
        if not parameter_grads:
            embeddings = model.get_input_embeddings()
            handle = embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
            restore.append(handle.remove)
        yield
    finally:
        for undo in restore:
            undo()
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        if checkpointing and not was_checkpointing:
            disable()
        model.train(was_training)
        for module, p in dropouts:
            module.p = p
        for config, value in zip(configs, use_cache, strict=True):
            config.use_cache = value


def _checkpointing_api(model):
    """(enable, disable, is_on) under transformers' current or pre-5.x names."""
    if hasattr(model, "activation_checkpointing_enable"):
        return (
            model.activation_checkpointing_enable,
            model.activation_checkpointing_disable,
            model.is_activation_checkpointing,
        )
    return (
        model.gradient_checkpointing_enable,
        model.gradient_checkpointing_disable,
        model.is_gradient_checkpointing,
    )


def last_position(attention_mask) -> int:
    """``predicted`` seeds the argmax logit at the last non-pad position."""
    return int(torch.nonzero(attention_mask.bool())[-1])


def next_token_positions(attention_mask, answer_start: int | None = None) -> torch.Tensor:
    """``next-token`` seeds the teacher-forced logit of the next token at these positions:
    every non-pad position followed by one, or (chat answers) those predicting a token at
    or after ``answer_start``."""
    keep = attention_mask.bool()
    seeded = keep[:-1] & keep[1:]
    if answer_start is not None:
        seeded[: max(answer_start - 1, 0)] = False
    return torch.nonzero(seeded).squeeze(1)


def relevance_pass(
    model, input_ids, attention_mask, target: str, answer_start: int | None = None
) -> PassResult:
    """Forward and backward one sequence (1-D ``input_ids``) under the active rules.

    Gradients land in ``p.grad`` (or in whatever post-accumulate hooks consume them).
    Padding positions are masked in attention and never seeded. The output head
    computes logits only at the positions the target seeds (transformers'
    ``logits_to_keep``): the others would get no gradient anyway.
    """
    captured = {}

    def keep_embeddings(_module, _inputs, output):
        captured["embeddings"] = output
        output.register_hook(lambda grad: captured.__setitem__("grad", grad))

    handle = model.get_input_embeddings().register_forward_hook(keep_embeddings)
    try:
        if target == "predicted":  # the output head runs on the seeded position only
            keep = torch.tensor([last_position(attention_mask)], device=input_ids.device)
        else:
            keep = next_token_positions(attention_mask, answer_start)
        outputs = model(
            input_ids=input_ids.unsqueeze(0),
            attention_mask=attention_mask.unsqueeze(0),
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = outputs.logits[0]
        if target == "predicted":
            seed = logits[0].float().max()
        else:  # next-token, or log-likelihood (Fisher): at the observed next tokens
            if target == "log-likelihood":
                logits = torch.log_softmax(logits.float(), dim=-1)
            rows = torch.arange(len(keep), device=logits.device)
            seed = logits[rows, input_ids[keep + 1].to(logits.device)].float().sum()
        seed.backward()
    finally:
        handle.remove()
    relevance = (captured["embeddings"].detach().float() * captured["grad"].float()).sum()
    return PassResult(
        target=float(seed.detach()),
        input_relevance=float(relevance),
        tokens=int(attention_mask.sum()),
    )

"""The importance signals ``lrp-compute --method`` can write, one row each.

Each writes the same score format (one tensor per checkpoint tensor, mean over prompts)
and records its ``quantity``, so the merge knows how to combine it with a task vector
(docs/method.md):

* ``attnlrp``: mean |d target / d theta| under the AttnLRP rules (the default);
* ``gradient``: the same pass and target without the rules, what the rules add isolated;
* ``fisher``: diagonal empirical Fisher, the mean over prompts of the squared gradient of
  the log-likelihood of the observed next tokens (the answer's, for chats);
* ``activation``: forward only; for every linear layer the mean over prompts of the
  summed squared inputs per input column (the diagonal of X^T X, OBS/SparseGPT-style),
  broadcast over the weight's rows; for embedding matrices the number of times each row
  was looked up. Other tensors (norms, convolutions, fused MoE experts) get no scores;
* ``gram``: RegMean statistics, not scores: for every distinct input of linear layers the
  mean over prompts of its Gram matrix sum_t w_t x_t x_t^T (:mod:`.gram_statistics`), the tokens
  weighted by ``--token-weighting`` (:data:`GRAM_SIGNALS`: ``none`` and ``answer`` are a
  forward pass, ``relevance`` and ``gradient`` a forward and a backward pass, under the
  AttnLRP rules for ``relevance`` only, computing no parameter gradients).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Signal:
    name: str
    #: what the score file holds (scores/file.py lists the known quantities)
    quantity: str
    #: AttnLRP rules patched in during the pass (input relevance then conserves the target)
    rules: bool
    #: False: forward passes only (input statistics)
    backward: bool
    #: accumulate squared gradients instead of absolute ones
    square: bool = False
    #: what the backward pass starts from when the signal fixes it (else ``--target``);
    #: for a forward-only signal, what it records instead of a target
    fixed_target: str | None = None
    #: gram: how the tokens of each prompt are weighted (None: not a Gram signal)
    token_weighting: str | None = None
    #: the backward pass computes parameter gradients (False: activation gradients only)
    parameter_grads: bool = True
    #: how chats are tokenized when the signal decides it (else as ``--target`` says):
    #: ``next-token`` keeps a chat's answer and where it starts
    chat_target: str | None = None

    @property
    def is_gram(self) -> bool:
        """The signal writes Gram matrices per layer input, not one score per entry."""
        return self.token_weighting is not None

    def target(self, chosen: str) -> str:
        """The backward target this signal uses when the user chose ``chosen``."""
        return self.fixed_target or chosen

    @property
    def pass_name(self) -> str:
        """What one prompt's pass is called in progress bars and messages."""
        if not self.backward:
            return "forward"
        return "relevance" if self.rules else "gradient"


SIGNALS: dict[str, Signal] = {
    "attnlrp": Signal("attnlrp", "mean_abs_grad", rules=True, backward=True),
    "gradient": Signal("gradient", "mean_abs_grad", rules=False, backward=True),
    "fisher": Signal(
        "fisher",
        "mean_sq_grad",
        rules=False,
        backward=True,
        square=True,
        fixed_target="log-likelihood",
    ),
    "activation": Signal(
        "activation", "mean_sq_input", rules=False, backward=False, fixed_target="inputs"
    ),
}


def _gram(weighting: str, backward: bool = False, rules: bool = False) -> Signal:
    """A forward weighting reads whole conversations (the answer's tokens are the data a
    fine-tune was trained on; ``answer`` keeps only them); a backward one explains
    ``--target``, which decides how chats are tokenized."""
    return Signal(
        "gram",
        "input_gram",
        rules=rules,
        backward=backward,
        fixed_target=None if backward else "inputs",
        token_weighting=weighting,
        parameter_grads=False,
        chat_target=None if backward else "next-token",
    )


#: ``--method gram``'s signal for each ``--token-weighting`` (the first is the default)
GRAM_SIGNALS: dict[str, Signal] = {
    "none": _gram("none"),
    "answer": _gram("answer"),
    "relevance": _gram("relevance", backward=True, rules=True),
    "gradient": _gram("gradient", backward=True),
}
TOKEN_WEIGHTINGS = tuple(GRAM_SIGNALS)
SIGNALS["gram"] = GRAM_SIGNALS["none"]


def signal_of(method: str, token_weighting: str | None = None) -> Signal:
    """The signal of ``--method`` (and, for ``gram``, ``--token-weighting``)."""
    if method == "gram":
        return GRAM_SIGNALS[token_weighting or TOKEN_WEIGHTINGS[0]]
    return SIGNALS[method]

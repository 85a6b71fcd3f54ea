"""Token-weighted Gram matrices of linear layers' inputs: the statistics of RegMean.

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023) merges a linear layer y = x W^T as the least-squares fit to every model's
outputs on its own data, W = (sum_i G_i)^-1 sum_i G_i W_i, with G_i = X_i^T X_i the Gram
matrix of the layer's inputs under model i. For every distinct input of the model's
``nn.Linear`` layers (q/k/v read one tensor, gate/up another) this accumulator sums, per
prompt, ``G = sum_t w_t x_t x_t^T`` in float32 (x_t the input at position t, in the pass's
dtype, converted to float32); the score file holds the mean over prompts.

The token weights ``w_t`` (``--token-weighting``), T the prompt's tokens, n the rows the
layer reads (n = T, except the output head under a backward target: it reads only the
positions the target is computed at, and the others count as R_t = 0):

* ``none``: w_t = 1 (plain RegMean);
* ``answer``: w_t = 1 at the positions the ``next-token`` target seeds
  (:func:`.relevance.next_token_positions`: every position followed by a token; for a chat
  with an answer, the positions predicting the answer's tokens), 0 elsewhere;
* ``relevance``: w_t = T |R_t| / sum_s |R_s| with R_t = sum_f x_{t,f} d target / d x_{t,f}
  under the AttnLRP rules: the relevance reaching the layer's input tensor at position t
  (through every layer reading it), the target being ``--target``; each prompt keeps the
  total weight T it has unweighted. If R is zero everywhere (or no gradient reaches the
  input), w_t = T / n;
* ``gradient``: the same with the plain gradient (no rules).

Which layers share an input is observed, not assumed from names: a forward pass of the
first prompt (the probe, :func:`shared_inputs`) groups the layers whose forward pre-hooks
receive the same tensor object, and every pass checks that the groups still hold. The
backward passes compute no parameter gradients (:func:`.relevance.backward_ready` with
``parameter_grads=False``); under gradient checkpointing, the forward recomputed during
the backward pass is ignored (the hooks only count the model's own forward).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from mergekit_lrp.scoring.options import ComputeError
from mergekit_lrp.scoring.relevance import next_token_positions

#: weightings that need a backward pass (the others are forward only)
BACKWARD_WEIGHTINGS = ("relevance", "gradient")
SUFFIX = ".input_gram"


def gram_name(weight: str) -> str:
    """The stored name of the Gram matrix of ``weight``'s input (``.weight`` replaced)."""
    return weight.removesuffix(".weight") + SUFFIX


class GramAccumulator:
    """Running float32 sums of token-weighted Gram matrices, one per distinct input of the
    ``nn.Linear`` layers of ``net`` whose weights are among ``parameters`` (score name ->
    parameter; checkpoint names in lrp-compute).

    ``weighting``: one of ``none``, ``answer``, ``relevance``, ``gradient`` (module doc).
    ``probe``: token ids (1-D) of the first prompt, for :func:`shared_inputs`.
    """

    def __init__(
        self,
        net: nn.Module,
        parameters: Mapping[str, nn.Parameter],
        weighting: str,
        on_device: bool = False,
        probe: torch.Tensor | None = None,
    ):
        self.net = net
        self.weighting = weighting
        self.backward = weighting in BACKWARD_WEIGHTINGS
        layers, self.unhooked = linear_layers(net, parameters)
        if not layers:
            raise ComputeError(
                "--method gram hooks torch.nn.Linear layers, and this model "
                f"({type(net).__name__}) has none whose weight is a checkpoint tensor; use "
                "--method attnlrp, gradient or fisher, or merge it without Gram statistics"
            )
        #: layer (score name of its weight) -> the first layer reading the same input
        self.leader = shared_inputs(net, layers, probe)
        for name in layers:
            if name not in self.leader:
                self.unhooked[name] = "not run on the first prompt"
        if not self.leader:
            raise ComputeError(
                f"--method gram: none of the {len(layers)} linear layers of this model ran "
                "in a forward pass of the first prompt, so none can be hooked; use --method "
                "attnlrp, gradient or fisher"
            )
        self.layers = {name: layers[name] for name in self.leader}
        members: dict[str, list[str]] = defaultdict(list)
        for name, leader in self.leader.items():
            members[leader].append(name)
        #: leader -> the stored name of its group's Gram matrix
        self.group_name = {leader: gram_name(min(names)) for leader, names in members.items()}
        #: weight (score name) -> the stored name of its input's Gram matrix
        self.gram_of = {name: self.group_name[self.leader[name]] for name in sorted(self.leader)}
        self.sums = {}
        for leader in sorted(self.group_name, key=self.group_name.get):
            weight = self.layers[leader].weight
            device = weight.device if on_device else torch.device("cpu")
            size = self.layers[leader].in_features
            self.sums[self.group_name[leader]] = torch.zeros(
                (size, size), dtype=torch.float32, device=device
            )
        #: Gram matrices that received a prompt in this process
        self.seen: set[str] = set()
        self._handles = []
        self._in_forward = False
        self._inputs: dict[int, tuple[weakref.ref, str]] = {}
        self._pending: dict[str, torch.Tensor] = {}  # leader -> input awaiting its gradient
        self._tokens: int | None = None
        self._answer_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------ the protocol

    def attach(self) -> None:
        self._handles.append(self.net.register_forward_pre_hook(self._begin_forward))
        self._handles.append(self.net.register_forward_hook(self._end_forward))
        for name, layer in self.layers.items():
            hook = layer.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            self._handles.append(hook)

    def detach(self) -> None:
        self._flush()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def start_prompt(self, tokens: int, answer_start: int | None) -> None:
        self._flush()
        self._tokens = tokens
        if self.weighting == "answer":
            self._answer_rows = next_token_positions(torch.ones(tokens), answer_start)

    def totals(self) -> dict[str, torch.Tensor]:
        """The running sums (a finished prompt's inputs that no gradient reached added
        with uniform weights first)."""
        self._flush()
        return self.sums

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """The mean over ``count`` prompts of each Gram matrix, made exactly symmetric."""
        out = {}
        for name, total in self.totals().items():
            mean = total / count
            out[name] = (mean + mean.T) / 2
        return out

    # ------------------------------------------------------------------ the hooks

    def _begin_forward(self, _module, _args) -> None:
        self._inputs = {}
        self._in_forward = True

    def _end_forward(self, _module, _args, _output) -> None:
        self._in_forward = False
        self._inputs = {}

    def _hook(self, name: str):
        layer = self.layers[name]

        def consume(_module, args, kwargs) -> None:
            if not self._in_forward:  # checkpointing recomputes the forward in the backward
                return
            x = layer_input(name, layer, args, kwargs)
            found = self._inputs.get(id(x))
            reader = found[1] if found is not None and found[0]() is x else None
            if reader is None:
                self._inputs[id(x)] = (weakref.ref(x), name)
            if (reader or name) != self.leader[name]:
                raise ComputeError(
                    f"--method gram: linear layer {name} read "
                    + (f"the input of {reader}" if reader else "an input of its own")
                    + " in this pass, but "
                    + (
                        "its own"
                        if self.leader[name] == name
                        else f"the input of {self.leader[name]}"
                    )
                    + " in the forward pass of the first prompt; the model's layers change "
                    "which input they share, so their Gram matrices cannot be grouped"
                )
            if reader is not None:  # the group's first layer counted this input
                return
            self.seen.add(self.group_name[name])
            if self.backward:
                self._pending[name] = x.detach()
                if x.requires_grad:
                    x.register_hook(self._gradient(name))
            else:
                self._add_forward(name, x.detach())

        return consume

    def _gradient(self, leader: str):
        def consume(grad: torch.Tensor) -> None:
            x = self._pending.pop(leader, None)
            if x is None:
                return
            flat = _rows(x)
            relevance = (flat * _rows(grad)).sum(dim=1)
            self._add(leader, flat, relevance_weights(relevance, self._prompt_tokens()))

        return consume

    def _flush(self) -> None:
        """Inputs no gradient reached (R = 0): uniform weights T / n."""
        pending, self._pending = self._pending, {}
        for leader, x in pending.items():
            flat = _rows(x)
            zero = torch.zeros(flat.shape[0], device=flat.device)
            self._add(leader, flat, relevance_weights(zero, self._prompt_tokens()))

    def _add_forward(self, leader: str, x: torch.Tensor) -> None:
        flat = _rows(x)
        if self.weighting == "answer":
            if flat.shape[0] != self._prompt_tokens():
                raise ComputeError(
                    f"--token-weighting answer: linear layer {leader} read {flat.shape[0]} "
                    f"rows for a {self._prompt_tokens()}-token prompt (a layer that sees some "
                    "tokens only, such as a per-expert layer), so its rows cannot be matched "
                    "to the answer's positions; use --token-weighting none or relevance"
                )
            flat = flat[self._answer_rows.to(flat.device)]
        self._add(leader, flat)

    def _add(self, leader: str, flat: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Add sum_t w_t x_t x_t^T (``flat``: one float32 row per position) to the sum.

        The prompt's matrix is computed on its own, then added: the sum is then a plain
        sequence of float32 additions of per-prompt matrices, whatever it held before
        (two processes of one prompt each write the bytes one process writes).
        """
        total = self.sums[self.group_name[leader]]
        weighted = flat if weights is None else flat * weights[:, None]
        total.add_((weighted.T @ flat).to(total.device))

    def _prompt_tokens(self) -> int:
        if self._tokens is None:
            raise RuntimeError("GramAccumulator.start_prompt was not called before the pass")
        return self._tokens


def relevance_weights(relevance: torch.Tensor, tokens: int) -> torch.Tensor:
    """w_t = T |R_t| / sum_s |R_s| for the n rows of ``relevance``; T / n each when R is
    zero everywhere."""
    magnitude = relevance.abs()
    total = magnitude.sum()
    if total == 0:
        return torch.full_like(magnitude, tokens / magnitude.numel())
    return tokens * magnitude / total


def _rows(x: torch.Tensor) -> torch.Tensor:
    """One float32 row per position (the batch holds one prompt)."""
    return x.reshape(-1, x.shape[-1]).float()


def layer_input(name: str, layer: nn.Linear, args, kwargs) -> torch.Tensor:
    """The tensor a linear layer is called with; a one-line error when it cannot be read."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.shape[-1:] != (layer.in_features,):
        raise ComputeError(
            f"--method gram cannot read the input of linear layer {name}: it is called "
            f"with {type(x).__name__}"
            + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
            + f", not a tensor of {layer.in_features} features; use --method attnlrp, "
            "gradient or fisher for this model"
        )
    return x


def linear_layers(
    net: nn.Module, parameters: Mapping[str, nn.Parameter]
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """(score name -> the ``nn.Linear`` whose weight it is, score name -> why a matrix of
    ``parameters`` gets no Gram matrix).

    A weight shared with another module (an output head tied to the input embeddings) is
    not hooked: the Gram matrix of the head's input says nothing about the embedding
    lookup the same tensor also is.
    """
    name_of = {id(p): name for name, p in parameters.items()}
    users: dict[int, list[str]] = defaultdict(list)
    owner: dict[int, str] = {}  # parameter -> the class of the module holding it
    for module_name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users[id(weight)].append(module_name)
        for parameter in module.parameters(recurse=False):
            owner.setdefault(id(parameter), type(module).__name__)
    layers: dict[str, nn.Linear] = {}
    unhooked: dict[str, str] = {}
    for module in net.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) not in name_of:
            continue
        name = name_of[id(module.weight)]
        if len(users[id(module.weight)]) > 1:
            unhooked[name] = f"tied: the weight of {' and '.join(users[id(module.weight)])}"
        else:
            layers[name] = module
    for name, parameter in parameters.items():
        if parameter.dim() >= 2 and name not in layers and name not in unhooked:
            unhooked[name] = f"not nn.Linear ({owner.get(id(parameter), 'a parameter')})"
    return layers, unhooked


def shared_inputs(
    net: nn.Module, layers: Mapping[str, nn.Linear], probe: torch.Tensor | None = None
) -> dict[str, str]:
    """Each layer that ran in a forward pass of ``probe`` -> the first layer (in call
    order) that read the same input tensor object (itself if none did before it)."""
    if probe is None:
        vocabulary = net.get_input_embeddings().num_embeddings
        probe = torch.arange(1, 5) % vocabulary
    leader: dict[str, str] = {}
    inputs: dict[int, tuple[weakref.ref, str]] = {}

    def record(name: str):
        def hook(layer, args, kwargs) -> None:
            x = layer_input(name, layer, args, kwargs)
            found = inputs.get(id(x))
            reader = found[1] if found is not None and found[0]() is x else None
            if reader is None:
                inputs[id(x)] = (weakref.ref(x), name)
            first = reader or name
            if leader.setdefault(name, first) != first:
                raise ComputeError(
                    f"--method gram: linear layer {name} runs more than once in a forward "
                    "pass, on different inputs, so its input has no one Gram matrix; use "
                    "--method attnlrp, gradient or fisher for this model"
                )

        return hook

    handles = [
        layer.register_forward_pre_hook(record(name), with_kwargs=True)
        for name, layer in layers.items()
    ]
    device = net.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            net(input_ids=probe.to(device)[None], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return leader

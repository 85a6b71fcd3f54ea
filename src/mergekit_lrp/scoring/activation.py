"""Input second moments of linear layers (and lookup counts of embeddings), forward only.

For a linear layer y = x W^T, the diagonal of the layer's input Hessian proxy X^T X is
the summed square of each input column over tokens: SparseGPT / OBS rank a weight entry
W_ij by W_ij^2 * (X^T X)_jj. The sums are kept per input column (one vector a layer) and
broadcast to the weight's shape when the scores are written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mergekit_lrp.scoring.options import ComputeError


class ActivationAccumulator:
    """Running sums of squared inputs per input column, for the named parameters that are
    the weights of ``nn.Linear`` or ``nn.Embedding`` modules of ``net``."""

    def __init__(self, net: nn.Module, parameters: Mapping[str, nn.Parameter]):
        by_id = {id(p): name for name, p in parameters.items()}
        self.modules: dict[str, nn.Module] = {}
        for module in net.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                name = by_id.get(id(module.weight))
                if name is not None and name not in self.modules:
                    self.modules[name] = module
        if not any(isinstance(m, nn.Linear) for m in self.modules.values()):
            raise ComputeError(
                "--method activation hooks torch.nn.Linear layers, and this model has none "
                "whose weight is a checkpoint tensor; use --method attnlrp, gradient or fisher"
            )
        self.shapes = {name: tuple(parameters[name].shape) for name in self.modules}
        self.sums = {
            name: torch.zeros(_columns(module), dtype=torch.float32)
            for name, module in self.modules.items()
        }
        #: parameters whose module ran in this process
        self.seen: set[str] = set()
        self._handles = []

    def attach(self) -> None:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_prompt(self, tokens: int, answer_start: int | None) -> None:
        pass

    def _hook(self, name: str):
        total, module = self.sums[name], self.modules[name]

        def consume(_module, args) -> None:
            inputs = args[0].detach()
            if isinstance(module, nn.Embedding):
                counts = torch.bincount(inputs.reshape(-1).cpu(), minlength=total.numel())
                total.add_(counts[: total.numel()].float())
            else:
                flat = inputs.reshape(-1, inputs.shape[-1]).float()
                total.add_((flat * flat).sum(dim=0).cpu())
            self.seen.add(name)

        return consume

    def scores(self, count: int) -> dict[str, torch.Tensor]:
        """Mean over ``count`` prompts, broadcast to each weight's shape."""
        out = {}
        for name, total in self.sums.items():
            mean = total / count
            if isinstance(self.modules[name], nn.Embedding):
                out[name] = mean[:, None].expand(self.shapes[name]).contiguous()
            else:
                out[name] = mean.expand(self.shapes[name]).contiguous()
        return out

    def totals(self) -> dict[str, torch.Tensor]:
        return self.sums


def _columns(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    return module.in_features

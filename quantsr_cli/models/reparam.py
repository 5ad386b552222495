"""Re-parameterised blocks folded into the one conv they compute in eval mode, before quantization.

Some SR blocks train as several convs and run as their exact sum (SPAN's ``Conv3XC``: 1x1 -> 3x3 -> 1x1
plus a 1x1 skip in training, ``eval_conv`` in eval). Their training and eval paths use different layers,
so none of them could be quantized and packed as is; folded, the block is one plain conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["REPARAMETERIZE", "Reparameterized", "fold_blocks"]


class Reparameterized(nn.Module):
    """A re-parameterised block folded into its inference conv (``eval_conv``, same key as in the block),
    then an optional LeakyReLU: what the block computes in eval mode, as one plain conv to quantize."""

    def __init__(self, eval_conv: nn.Conv2d, relu_slope: float | None) -> None:
        super().__init__()
        self.eval_conv = eval_conv
        self.relu_slope = relu_slope

    def forward(self, x: Tensor) -> Tensor:
        out = self.eval_conv(x)
        return out if self.relu_slope is None else F.leaky_relu(out, negative_slope=self.relu_slope)


def _fold_conv3xc(module: nn.Module) -> nn.Module:
    """SPAN's ``Conv3XC`` (1x1 -> 3x3 -> 1x1 plus a 1x1 skip in training, their exact sum ``eval_conv`` in eval)."""
    with torch.no_grad():
        if module.eval_conv.weight.device.type != "meta":
            module.update_params()
    conv = module.eval_conv
    conv.weight.requires_grad_(True)
    if conv.bias is not None:
        conv.bias.requires_grad_(True)
    return Reparameterized(conv, 0.05 if module.has_relu else None)


REPARAMETERIZE = {"Conv3XC": _fold_conv3xc}
"""Re-parameterised blocks (by class name) folded into one conv before quantization (hparam ``fold``):
otherwise their training and eval paths differ and none of their convs could be quantized and packed."""


def fold_blocks(model: nn.Module) -> int:
    """Replace every :data:`REPARAMETERIZE` block of ``model`` by its folded conv, in place; returns how many."""
    found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in REPARAMETERIZE]
    for name, module in found:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, REPARAMETERIZE[type(module).__name__](module))
    return len(found)

"""The ``torch`` backend: the float reference every other backend is tested against.

Each packed layer fake-quantizes its input with its own activation parameters
(``step * clamp(round((x + shift) / step), qmin, qmax)``), unpacks its codes, dequantizes
``scale * (u - zero)`` to a float32 weight (cached per layer) and runs ``F.conv2d`` / ``F.linear``.
Its output equals the fake-quantized QAT model's in eval mode up to float32 summation order.
Runs on any device torch supports.
"""

from __future__ import annotations

from torch import nn

from quantsr_cli.packing.modules import Impl, PackedModule, reference_forward

NAME = "torch"


def unavailable_reason() -> str | None:
    """The reference runs wherever torch does."""
    return None


def prepare(module: PackedModule) -> Impl:
    """Return the reference ``impl`` for ``module`` and warm its dequantized-weight cache."""
    if hasattr(module, "dequantized_weight"):
        module.dequantized_weight()
    module.backend_note = "torch reference"
    return reference_forward


def prepare_model(model: nn.Module) -> None:
    """Nothing model-wide to prepare for the reference."""


def release_model(model: nn.Module) -> None:
    """Nothing model-wide to undo for the reference."""

"""Export records and the two quantizer base classes (the contract packing relies on).

Every activation quantizer's forward equals ``ActParams`` applied with :func:`apply_act_params`,
and every weight quantizer's forward equals ``scale * (codes - zero)`` from its ``export``; both
are tested bit-exactly in ``tests/test_quant.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from quantsr_cli.config import QUANT_BITS
from quantsr_cli.errors import CheckpointError, ConfigError


class ActParams(NamedTuple):
    """Activation fake-quant parameters: ``x_hat = step * clamp(round((x + shift) / step), qmin, qmax)``.

    Attributes:
        bits: activation bit-width (2, 4 or 8).
        step: float32 tensor of shape ``(1,)``, the quantization step (> 0).
        qmin: lowest integer code (``−2**(bits−1)`` signed, ``0`` unsigned; PAMS: ``−(2**(bits−1)−1)``).
        qmax: highest integer code.
        shift: ``None`` or a float32 vector over the channel dim (dim 1 of conv inputs, last dim of
            linear inputs), added before quantization.
    """

    bits: int
    step: Tensor
    qmin: int
    qmax: int
    shift: Tensor | None


class WeightParams(NamedTuple):
    """Weight export: dequantized weight ``= scale * (codes.float() - zero)``.

    Attributes:
        codes: uint8 tensor of the weight's shape, values in ``[0, 2**bits − 1]``.
        scale: float32 tensor of shape ``(1,)`` (per tensor).
        zero: integer or half-integer offset (float).
    """

    codes: Tensor
    scale: Tensor
    zero: float


def apply_act_params(x: Tensor, p: ActParams, channel_dim: int = 1) -> Tensor:
    """Reference activation fake-quant from exported parameters (the packing oracle's formula).

    Args:
        x: activations; the shift is broadcast over ``channel_dim`` (1 for ``(N, C, H, W)`` conv
            inputs, −1 for ``(..., C)`` linear inputs).
        p: exported parameters.

    Returns:
        ``x``'s shape, bit-identical to the quantizer's forward.
    """
    if p.shift is not None:
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        x = x + p.shift.reshape(shape)
    return p.step * torch.clamp(torch.round(x / p.step), p.qmin, p.qmax)


def check_bits(bits: int) -> int:
    """Validate a quantizer bit-width (32 = full precision never reaches a quantizer)."""
    if bits not in QUANT_BITS:
        raise ConfigError(f"quantizer bits={bits}; choose one of {', '.join(map(str, QUANT_BITS))}")
    return bits


class ActQuantizer(nn.Module):
    """Base of activation quantizers.

    Subclasses hold their state in parameters and buffers only (an ``initialized`` bool buffer at
    least), so ``load_state_dict`` restores them completely and never triggers re-initialisation.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method: str = ""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def create(cls, bits: int, shift_shape: tuple[int, ...] | None = None, sign_rule: str = "min") -> ActQuantizer:
        """The quantizer for one input: ``shift_shape`` is the shape a per-channel shift would have
        (``None`` at attention points), ``sign_rule`` the ``QuantConfig.act_sign`` choice. Subclasses
        use what applies to them; the default ignores both."""
        return cls(bits)

    def export(self) -> ActParams:
        """Parameters reproducing the eval-mode forward exactly. Raises if never initialised."""
        raise NotImplementedError

    def load_packed(self, params: ActParams) -> None:
        """Set the state from a packed file's parameters so that :meth:`export` returns them again
        (fine-tuning a packed file). Only methods whose spec is ``fine_tunable`` implement it.

        Raises:
            CheckpointError: the parameters do not fit this quantizer.
        """
        raise CheckpointError(f"{self.method} activation quantizers cannot be rebuilt from a packed file")

    def _require_initialized(self) -> None:
        if not bool(self.initialized):
            raise CheckpointError(
                f"{self.method} activation quantizer was never initialised: run at least one "
                "forward pass (training or calibration) before exporting"
            )

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class WeightQuantizer(nn.Module):
    """Base of weight quantizers: ``forward(weight) -> fake-quantized weight`` of the same shape.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method: str = ""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def export(self, weight: Tensor) -> WeightParams:
        """Integer codes, scale and zero with ``forward(weight) == scale * (codes - zero)``."""
        raise NotImplementedError

    def load_packed(self, scale: Tensor, zero: float) -> None:
        """Set the state from a packed layer's ``scale`` and ``zero`` so that, with the latent weight set
        to the dequantized weight ``scale * (codes - zero)``, :meth:`export` gives back the same codes
        (fine-tuning a packed file). Only methods whose spec is ``fine_tunable`` implement it.

        Raises:
            CheckpointError: the packed grid does not fit this quantizer.
        """
        raise CheckpointError(f"{self.method} weight quantizers cannot be rebuilt from a packed file")

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def to_codes(k: Tensor, zero: float, bits: int) -> Tensor:
    """Integer levels ``k`` (float tensor of exact integers) → uint8 codes ``k + zero``."""
    u = torch.round(k.detach() + zero)
    if u.numel() and (u.min() < 0 or u.max() > 2**bits - 1):  # pragma: no cover - invariant
        raise AssertionError("weight code out of range")
    return u.to(torch.uint8)

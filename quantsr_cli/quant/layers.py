"""QAT modules: ``QConv2d``, ``QLinear`` (quantized input activation + weight) and ``ActQuant``
(a standalone activation point), plus the method → quantizer factories (through the registry).

``QConv2d``/``QLinear`` subclass ``nn.Conv2d``/``nn.Linear``, so ``weight``/``bias`` keep their
state-dict keys; quantizer state lives under ``<layer>.act_q.*`` and ``<layer>.w_q.*``.
A bit-width of 32 means "not quantized": the corresponding ``act_q``/``w_q`` is ``None``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import ConfigError
from quantsr_cli.quant.base import ActParams, ActQuantizer, WeightQuantizer
from quantsr_cli.quant.methods import FULL_PRECISION_BITS, method_spec

__all__ = ["FULL_PRECISION_BITS", "ActQuant", "QConv2d", "QLinear", "make_act_quantizer", "make_weight_quantizer"]


def make_act_quantizer(method: str, bits: int, shift_shape: tuple[int, ...] | None = None,
                       sign_rule: str = "min") -> ActQuantizer | None:
    """Activation quantizer of ``method`` at ``bits`` (``None`` for 32 bits).

    Args:
        method: a registered method (:data:`quantsr_cli.quant.methods.METHODS`).
        bits: 2, 4, 8 or 32.
        shift_shape: shape of a per-channel shift ``τ̂`` for this input, or ``None`` (per-tensor, no
            shift); used by methods with a channel shift only.
        sign_rule: ``"min"`` or ``"mse"`` (``QuantConfig.act_sign``); learned-step methods only.

    Raises:
        ConfigError: an unknown method.
    """
    return method_spec(method).make_act(bits, shift_shape, sign_rule)


def make_weight_quantizer(method: str, bits: int) -> WeightQuantizer | None:
    """Weight quantizer of ``method`` at ``bits`` (``None`` for 32 bits); ConfigError for an unknown method."""
    return method_spec(method).make_weight(bits)


class _QuantMixin:
    """Shared bookkeeping of quantized layers (plain attributes: method, w_bits, a_bits)."""

    method: str
    w_bits: int
    a_bits: int
    act_q: ActQuantizer | None
    w_q: WeightQuantizer | None

    def _setup_quant(self, config: QuantConfig, shift_shape: tuple[int, ...]) -> None:
        self.method, self.w_bits, self.a_bits = config.method, config.w_bits, config.a_bits
        self.act_q = make_act_quantizer(config.method, config.a_bits, shift_shape, config.act_sign)
        self.w_q = make_weight_quantizer(config.method, config.w_bits)
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        for q in (self.act_q, self.w_q):
            if q is not None:
                q.to(device=weight.device, dtype=weight.dtype)

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight (the FP weight when ``w_bits == 32``)."""
        weight: Tensor = self.weight  # type: ignore[attr-defined]
        return weight if self.w_q is None else self.w_q(weight)

    def quant_extra_repr(self) -> str:
        return f"method={self.method}, w_bits={self.w_bits}, a_bits={self.a_bits}"


class QConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with a quantized input activation (``act_q``, shift ``(1, C_in, 1, 1)``) and a
    quantized weight (``w_q``); the bias stays FP32 (as in QuantSR).

    Build with :meth:`from_float`. Forward: ``(N, C_in, H, W)`` → ``(N, C_out, H', W')``.
    """

    @classmethod
    def from_float(cls, module: nn.Conv2d, config: QuantConfig) -> QConv2d:
        """Wrap ``module``, reusing its ``weight``/``bias`` Parameters (no copy, same device/dtype).

        Args:
            module: a float ``nn.Conv2d`` (not already quantized).
            config: method and bit-widths.
        """
        if isinstance(module, QConv2d) or type(module) is not nn.Conv2d:
            raise ConfigError(f"cannot quantize {type(module).__name__}: expected a plain nn.Conv2d")
        q = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
        )
        q.weight = module.weight
        q.bias = module.bias
        q._setup_quant(config, (1, module.in_channels, 1, 1))
        q.train(module.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.act_q is not None:
            x = self.act_q(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_extra_repr()}"


class QLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with a quantized input activation (``act_q``, shift over the last dim, shape
    ``(C_in,)``) and a quantized weight (``w_q``); FP bias.

    Build with :meth:`from_float`. Forward: ``(..., C_in)`` → ``(..., C_out)``.
    """

    @classmethod
    def from_float(cls, module: nn.Linear, config: QuantConfig) -> QLinear:
        """Wrap ``module``, reusing its ``weight``/``bias`` Parameters (no copy, same device/dtype)."""
        if isinstance(module, QLinear) or type(module) is not nn.Linear:
            raise ConfigError(f"cannot quantize {type(module).__name__}: expected a plain nn.Linear")
        q = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        q.weight = module.weight
        q.bias = module.bias
        q._setup_quant(config, (module.in_features,))
        q.train(module.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.act_q is not None:
            x = self.act_q(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_extra_repr()}"


class ActQuant(nn.Module):
    """An activation point (replaces an ``nn.Identity``): SwinIR attention q, k, v and softmax output.

    Per-tensor and **without** a per-channel shift (``shift=None``): attention tensors have shape
    ``(B_, heads, N, d)`` (or ``(B_, heads, N, N)``) where no dim is a layer's input channel.
    Learned-step methods decide signedness from the first batch (q/k/v → signed, softmax ≥ 0 →
    unsigned); DoReFa is always unsigned ``[0, 1]``, PAMS always symmetric.

    Args:
        config: method and ``a_bits`` (2, 4 or 8).
    """

    def __init__(self, config: QuantConfig) -> None:
        super().__init__()
        act_q = make_act_quantizer(config.method, config.a_bits, None, config.act_sign)
        if act_q is None:
            raise ConfigError("ActQuant needs a_bits in 2, 4, 8 (32 means no activation point)")
        self.method, self.a_bits = config.method, config.a_bits
        self.act_q = act_q

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (any shape)."""
        return self.act_q(x)

    def export(self) -> ActParams:
        """Same as ``self.act_q.export()``."""
        return self.act_q.export()

    def extra_repr(self) -> str:
        return f"method={self.method}, a_bits={self.a_bits}"

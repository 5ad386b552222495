"""Quantized conv/linear layers and activation points of the QArtSR engine.

A wrapped layer computes (QArtSR "quantizer design", SVDQuant-style)::

    W_eff = W + F1 @ F2                    # LoRA, merged before quantization (F1 = lora_b, F2 = lora_a)
    W_res = W_eff - L1 @ L2                # L1 = lr_u (O, r), L2 = lr_v (r, K): 16-bit low-rank branch
    y = op(Q_A(x / phi), Q_W(W_res * phi)) + bias + op16(x, L1 @ L2)

with ``phi`` a per-input-channel smoothing factor (``phi = exp(log_phi)``, initialised PassionSR-style
as ``max|x|^alpha / max|W|^alpha``). The original ``weight``/``bias`` Parameters are the very objects
of the FP layer (shared, never trained, kept bit-identical); only :meth:`finetune_parameters` train.
With quantization disabled the layer computes ``op(x, W_eff) + bias``, i.e. exactly the FP layer
while the LoRA is zero. Layer inputs are ``(N, C, H, W)`` (conv) or ``(..., C)`` (linear).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.diffusion.quantizers import RangeObserver, RangeQuantizer, make_quantizer

if TYPE_CHECKING:
    from quantsr_cli.diffusion.qmodel import QuantSpec


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back (differentiable): the 16-bit branch of the layer."""
    return t.to(torch.float16).to(t.dtype)


def _quantizer(opts: QuantSpec, bits: int, channels: int, axis: int | None, weight: bool) -> nn.Module:
    if bits >= 32:
        return nn.Identity()
    return make_quantizer(opts.quantizer, bits, channels, axis, is_weight=weight)


def _initialized(q: nn.Module) -> bool:
    return not isinstance(q, RangeQuantizer) or bool(q.initialized)


class _QuantLayerMixin:
    """Shared logic of :class:`QuantConv2d` and :class:`QuantLinear` (see the module docstring)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    channel_dim: int

    def _setup(self, opts: QuantSpec) -> None:
        out_ch, in_ch = self.weight.shape[0], self.weight.shape[1]
        k = self.weight[0].numel()
        dev = self.weight.device
        self.options = opts
        self.w_q = _quantizer(opts, opts.w_bits, out_ch, 0, True).to(dev)
        self.act_q = _quantizer(opts, opts.a_bits, 1, None, False).to(dev)
        grouped = getattr(self, "groups", 1) != 1
        self.log_phi = nn.Parameter(torch.zeros(in_ch, device=dev)) if opts.smooth and not grouped else None
        r = min(opts.lowrank, out_ch, k)
        self.lr_u = nn.Parameter(torch.zeros(out_ch, r, device=dev)) if r > 0 else None
        self.lr_v = nn.Parameter(torch.zeros(r, k, device=dev)) if r > 0 else None
        rl = min(opts.lora, out_ch, k)
        self.lora_a = nn.Parameter(torch.randn(rl, k, device=dev) / math.sqrt(k)) if rl > 0 else None
        self.lora_b = nn.Parameter(torch.zeros(out_ch, rl, device=dev)) if rl > 0 else None
        self.quant_enabled = False
        self.observer: RangeObserver | None = None

    # ----------------------------------------------------------------- parameters
    def finetune_parameters(self) -> Iterator[nn.Parameter]:
        """The trainable quantization-finetuning parameters: phi, low-rank, LoRA, quantizers."""
        for p in (self.log_phi, self.lr_u, self.lr_v, self.lora_a, self.lora_b):
            if p is not None:
                yield p
        yield from self.w_q.parameters()
        yield from self.act_q.parameters()

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        for p in (self.lora_a, self.lora_b):
            if p is not None:
                yield p

    # ----------------------------------------------------------------- weights
    def _phi_view(self, ndim: int, dim: int) -> torch.Tensor | None:
        if self.log_phi is None:
            return None
        shape = [1] * ndim
        shape[dim] = -1
        return torch.exp(self.log_phi).reshape(shape)

    def lora_delta(self) -> torch.Tensor | None:
        if self.lora_a is None:
            return None
        return (self.lora_b @ self.lora_a).reshape(self.weight.shape)

    def lowrank_weight(self) -> torch.Tensor | None:
        if self.lr_u is None:
            return None
        return (self.lr_u @ self.lr_v).reshape(self.weight.shape)

    def merged_weight(self) -> torch.Tensor:
        """``W + F1 F2`` (the FP weight the layer approximates), same shape as ``weight``."""
        delta = self.lora_delta()
        return self.weight if delta is None else self.weight + delta

    def quant_input_weight(self) -> torch.Tensor:
        """``(W_eff - L1 L2) * phi``: the tensor ``w_q`` quantizes."""
        w = self.merged_weight()
        low = self.lowrank_weight()
        if low is not None:
            w = w - low
        phi = self._phi_view(w.dim(), 1)
        return w if phi is None else w * phi

    @property
    def ready(self) -> bool:
        """True once every quantizer of the layer is initialised (calibrated or loaded)."""
        return _initialized(self.w_q) and _initialized(self.act_q)

    # ----------------------------------------------------------------- calibration
    def start_observing(self, momentum: float = 0.95) -> None:
        self.observer = RangeObserver(self.channel_dim, momentum)

    @torch.no_grad()
    def init_quantization(self) -> None:
        """Initialise phi, the SVD branch and both quantizers from the observed input statistics."""
        obs = self.observer
        if obs is None or not obs.ready:
            raise RuntimeError("init_quantization() needs an observed calibration pass first")
        opts = self.options
        w = self.merged_weight().detach().float()
        if self.log_phi is not None:
            w_absmax = w.abs().transpose(0, 1).reshape(w.shape[1], -1).amax(dim=1).clamp_min(1e-5)
            x_absmax = obs.stats["ema_absmax"].clamp_min(1e-5)
            phi = x_absmax**opts.smooth_alpha / w_absmax**opts.smooth_alpha
            self.log_phi.copy_(torch.log(phi.clamp(1e-4, 1e4)))
        if self.lr_u is not None:
            phi = self._phi_view(w.dim(), 1)
            ws = w if phi is None else w * phi
            u, s, vh = torch.linalg.svd(ws.reshape(w.shape[0], -1), full_matrices=False)
            r = self.lr_u.shape[1]
            root = s[:r].sqrt()
            v = (root[:, None] * vh[:r]).reshape((r,) + tuple(w.shape[1:]))
            if phi is not None:
                v = v / phi
            self.lr_u.copy_(u[:, :r] * root[None, :])
            self.lr_v.copy_(v.reshape(r, -1))
        if isinstance(self.w_q, RangeQuantizer):
            self.w_q.init_from_tensor(self.quant_input_weight())
        if isinstance(self.act_q, RangeQuantizer):
            lo, hi = obs.range(opts.act_init)
            if self.log_phi is not None:
                phi = torch.exp(self.log_phi)
                lo, hi = lo / phi, hi / phi
            self.act_q.init_range(lo.amin(), hi.amax())
        self.observer = None

    # ----------------------------------------------------------------- forward
    def _quant_forward(self, x: torch.Tensor, op, op16) -> torch.Tensor:
        phi = self._phi_view(x.dim(), self.channel_dim)
        xq = self.act_q(x if phi is None else x / phi)
        y = op(xq, self.w_q(self.quant_input_weight()), self.bias)
        if self.lr_u is not None:
            y = y + op16(_fp16(x))
        return y

    def _fp_or_observe(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
        return self.merged_weight()


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """Fake-quantized ``nn.Conv2d`` sharing the FP layer's ``weight``/``bias`` Parameters."""

    channel_dim = 1

    @classmethod
    def from_float(cls, conv: nn.Conv2d, opts: QuantSpec) -> QuantConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new._setup(opts)
        new.train(conv.training)
        return new

    def _lowrank16(self, x16: torch.Tensor) -> torch.Tensor:
        r = self.lr_u.shape[1]
        v = _fp16(self.lr_v).reshape((r,) + tuple(self.weight.shape[1:]))
        h = _fp16(self._conv_forward(x16, v, None))
        return _fp16(F.conv2d(h, _fp16(self.lr_u)[:, :, None, None]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C_in, H, W)`` → ``(N, C_out, H', W')``."""
        if not self.quant_enabled:
            return self._conv_forward(x, self._fp_or_observe(x), self.bias)
        return self._quant_forward(x, self._conv_forward, self._lowrank16)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """Fake-quantized ``nn.Linear`` sharing the FP layer's ``weight``/``bias`` Parameters."""

    channel_dim = -1

    @classmethod
    def from_float(cls, lin: nn.Linear, opts: QuantSpec) -> QuantLinear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
        new.weight = lin.weight
        new.bias = lin.bias
        new._setup(opts)
        new.train(lin.training)
        return new

    def _lowrank16(self, x16: torch.Tensor) -> torch.Tensor:
        return _fp16(F.linear(_fp16(F.linear(x16, _fp16(self.lr_v))), _fp16(self.lr_u)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C_in)`` → ``(..., C_out)``."""
        if not self.quant_enabled:
            return F.linear(x, self._fp_or_observe(x), self.bias)
        return self._quant_forward(x, F.linear, self._lowrank16)


class ActPoint(nn.Module):
    """A per-tensor activation quantizer standing in for an ``nn.Identity`` activation point
    (attention q, k, v and softmax output). Identity while quantization is disabled."""

    def __init__(self, opts: QuantSpec) -> None:
        super().__init__()
        self.options = opts
        self.act_q = _quantizer(opts, opts.a_bits, 1, None, False)
        self.quant_enabled = False
        self.observer: RangeObserver | None = None

    def finetune_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.act_q.parameters()

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    @property
    def ready(self) -> bool:
        return _initialized(self.act_q)

    def start_observing(self, momentum: float = 0.95) -> None:
        self.observer = RangeObserver(None, momentum)

    @torch.no_grad()
    def init_quantization(self) -> None:
        if self.observer is None or not self.observer.ready:
            raise RuntimeError("init_quantization() needs an observed calibration pass first")
        if isinstance(self.act_q, RangeQuantizer):
            lo, hi = self.observer.range(self.options.act_init)
            self.act_q.init_range(lo.amin(), hi.amax())
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any shape → same shape."""
        if not self.quant_enabled:
            if self.observer is not None:
                self.observer.update(x)
            return x
        return self.act_q(x)


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, ActPoint)

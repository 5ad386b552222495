"""Packed layers prepared for the engine's tensor-core kernel, and the engine's device-agnostic ops.

A :class:`TcLayer` holds what ``qsr_conv_tc`` reads for one packed conv/linear on one device: int8 weight
rows ``2u - 2zero`` (OHWI, ``(O, kh*kw*C)``), the float32 epilogue scale ``0.5 * w_scale * a_step`` (the
kernel's accumulator is twice the integer dot product), the bias, and the layer's input quantizer
(:class:`ActParams`). :class:`EngineOps` runs the engine kernels on torch tensors through an injected
``launch`` (cupy on a GPU; the CPU-shim tests substitute their own), so this module never imports cupy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from quantsr_cli.backends import cupy_plan as plan
from quantsr_cli.backends import engine_plan as ep
from quantsr_cli.packing.modules import tensor_key

Launcher = Callable[[plan.Launch, torch.device], None]


@dataclass(frozen=True)
class ActParams:
    """An activation quantizer: ``codes = clamp(round((x + shift) / step), qmin, qmax)``, ``x_hat = step * c``."""

    step: float
    qmin: int
    qmax: int
    shift: torch.Tensor | None  # float32 (C,) on the engine's device

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def sliced(self, c0: int, c1: int) -> ActParams:
        """The quantizer of channels ``c0..c1-1`` of this one's input (e.g. one block's slice of a concat)."""
        return replace(self, shift=None if self.shift is None else self.shift[c0:c1].contiguous())


@dataclass(frozen=True)
class TcLayer:
    """A packed conv (``ks`` 1 or 3, "same" padding, stride 1) or linear (``ks`` 1) ready for ``qsr_conv_tc``."""

    c: int
    o: int
    ks: int
    wq: torch.Tensor  # int8 (o, ks*ks*c)
    scale: torch.Tensor  # float32 (o,)
    bias: torch.Tensor | None  # float32 (o,)
    act: ActParams  # the layer's input quantizer

    def scaled(self, factor: float) -> TcLayer:
        """The same layer with its output multiplied by ``factor`` (folded into scale and bias)."""
        if factor == 1.0:
            return self
        bias = None if self.bias is None else (self.bias.double() * factor).float()
        return replace(self, scale=(self.scale.double() * factor).float(), bias=bias)


def act_params(module: Any, device: torch.device) -> ActParams:
    """The input quantizer of a packed layer (``a_step``, ``a_qmin``, ``a_qmax``, ``a_shift``)."""
    shift = getattr(module, "a_shift", None)
    return ActParams(float(module.a_step.reshape(-1)[0].item()), int(module.a_qmin), int(module.a_qmax),
                     None if shift is None else shift.detach().to(device, torch.float32).contiguous())


def tc_unsupported(module: Any) -> str | None:
    """None when ``qsr_conv_tc`` can run this packed layer, else why not."""
    if not hasattr(module, "qweight"):
        return "not a packed weight layer"
    try:
        if int(module.a_bits) >= 32:
            return "activations are not quantized (a_bits=32)"
        plan.zero2_of(float(module.w_zero), int(module.w_bits))
        plan.act_signed(int(module.a_qmin), int(module.a_qmax))
    except ValueError as exc:
        return str(exc)
    if hasattr(module, "kernel_size"):
        kh, kw = plan.pair(module.kernel_size)
        pad = module.padding
        if (kh, kw) not in ((1, 1), (3, 3)):
            return f"kernel {kh}x{kw} (the engine runs 1x1 and 3x3)"
        want = (kh // 2, kw // 2)
        if (plan.pair(pad) if not isinstance(pad, str) else ((kh // 2,) * 2 if pad == "same" else (0, 0))) != want:
            return f"padding {pad} (the engine runs 'same' padding)"
        for attr in ("stride", "dilation"):
            if plan.pair(getattr(module, attr, 1)) != (1, 1):
                return f"{attr}={getattr(module, attr)}"
        if int(getattr(module, "groups", 1)) != 1:
            return f"groups={module.groups}"
        c, o = int(module.in_channels), int(module.out_channels)
    else:
        c, o = int(module.in_features), int(module.out_features)
    if c % 16 or o % 16:
        return f"{c} -> {o} channels (the engine needs multiples of 16)"
    return None


def prepare_tc(module: Any, device: torch.device) -> TcLayer:
    """:class:`TcLayer` of a supported packed layer on ``device`` (cached on the module until its buffers change)."""
    reason = tc_unsupported(module)
    if reason is not None:
        raise ValueError(f"the engine cannot run this layer: {reason}")

    def build() -> TcLayer:
        w_bits = int(module.w_bits)
        z2 = plan.zero2_of(float(module.w_zero), w_bits)
        codes = module.codes().to(torch.int16)
        wq = (2 * codes - z2).to(torch.int8).contiguous()
        o = wq.shape[0]
        ws = module.w_scale.detach().double().reshape(-1)
        ws = ws.expand(o) if ws.numel() == 1 else ws
        act = act_params(module, device)
        scale = (0.5 * ws * act.step).float()
        bias = None if module.bias is None else module.bias.detach().float()
        ks = plan.pair(module.kernel_size)[0] if hasattr(module, "kernel_size") else 1
        c = wq.shape[1] // (ks * ks)
        return TcLayer(c, o, ks, wq.to(device), scale.contiguous().to(device),
                       None if bias is None else bias.contiguous().to(device), act)

    key = (*tensor_key(module.qweight, module.w_scale, module.bias, module.a_step, getattr(module, "a_shift", None)),
           str(device))
    return module.cached("engine", key, build)


SpecChooser = Callable[[TcLayer, int, int, int, bool], ep.TcSpec]


def default_spec(layer: TcLayer, n: int, h: int, w: int, yf32: bool) -> ep.TcSpec:
    """A reasonable specialisation without tuning: 64-channel slices, 4 warps, 4 pixel rows per warp (3x3)."""
    ot = min(64, layer.o) if layer.o % min(64, layer.o) == 0 else 16
    wm = 4 if layer.ks == 3 and layer.c <= 128 else 2
    return ep.TcSpec(layer.c, layer.ks, ot, 4, layer.act.signed, yf32=yf32, wm=wm)


class EngineOps:
    """The engine's kernels on torch tensors. ``launch`` runs a :class:`~cupy_plan.Launch`; ``max_ctas`` gives
    the persistent grid size of a specialisation; ``choose`` picks the specialisation of a conv (tuning)."""

    def __init__(self, launch: Launcher, max_ctas: Callable[[ep.TcSpec, torch.device], int],
                 choose: SpecChooser = default_spec) -> None:
        self.launch = launch
        self.max_ctas = max_ctas
        self.choose = choose

    def quant(self, x: torch.Tensor, act: ActParams, *, m: int, hw: int, c: int, x_ld: int, x_off: int = 0,
              mul: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``(m, c)`` of channels ``x_off..x_off+c-1`` of the channels-last float tensor ``x``
        (``m`` pixels of ``x_ld`` elements), optionally multiplied by ``mul`` ``(m // hw, c)`` first."""
        codes = out if out is not None else torch.empty((m, c), dtype=act.code_dtype(), device=x.device)
        dtype = "f16" if x.dtype == torch.float16 else "f32"
        self.launch(ep.plan_quant_nhwc(x, codes, m=m, hw=hw, c=c, x_ld=x_ld, x_off=x_off, step=act.step,
                                       qmin=act.qmin, qmax=act.qmax, shift=act.shift, mul=mul, dtype=dtype), x.device)
        return codes

    def conv(self, layer: TcLayer, codes: torch.Tensor, epi: ep.Epilogue, *, n: int, h: int, w: int) -> None:
        """``qsr_conv_tc`` of ``layer`` on ``codes`` ``(n*h*w, layer.c)`` with epilogue ``epi`` (its float
        output/residual dtype decides binary16 or float32)."""
        yf32 = any(t is not None and t.dtype == torch.float32 for t in (epi.yf, epi.res))
        spec = self.choose(layer, n, h, w, yf32)
        self.launch(ep.plan_conv_tc(spec, codes, layer.wq, epi, n=n, h=h, w=w, o=layer.o,
                                    max_ctas=self.max_ctas(spec, codes.device)), codes.device)

    def channel_mean_std(self, x: torch.Tensor, *, n: int, hw: int, c: int, x_ld: int,
                         x_off: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image channel mean and population std (float64 ``(n, c)``) of a channels-last float tensor."""
        chunks, chunk = ep.stats_chunks(hw)
        part = torch.empty((n, chunks, 2, c), dtype=torch.float32, device=x.device)
        dtype = "f16" if x.dtype == torch.float16 else "f32"
        self.launch(ep.plan_channel_stats(x, part, n=n, hw=hw, c=c, x_ld=x_ld, x_off=x_off, dtype=dtype,
                                          chunk=chunk), x.device)
        sums = part.double().sum(dim=1)
        mean = sums[:, 0] / hw
        var = (sums[:, 1] / hw - mean * mean).clamp_min(1e-12)
        return mean, var.sqrt()


def code_out(dst: torch.Tensor, act: ActParams, *, c0: int, c1: int, off: int = 0) -> ep.CodeOut:
    """Epilogue output of ``act``'s codes for channels ``c0..c1-1`` into ``dst`` (2-D, pixel rows)."""
    return ep.CodeOut(dst, dst.shape[1], off, c0, c1, act.step, act.qmin, act.qmax, act.shift)


__all__ = ["ActParams", "TcLayer", "EngineOps", "act_params", "tc_unsupported", "prepare_tc", "default_spec",
           "code_out"]

"""Whole-model forward plans of the engine: activations stay codes between packed layers.

A plan replaces a packed model's forward with a chain of engine kernels on channels-last buffers: each
quantized conv reads the *codes* its predecessor's fused epilogue wrote (activation, residual, concat slice
and the next layer's quantizer all in one pass), float tensors live only where the network needs them.
:class:`Precision` says in which float type: ``glue`` for the tensors between quantized layers (residual
streams, concatenations) and ``head`` for the full-precision layers before the first quantized one: their
values feed quantizers, so float16 there moves codes across rounding edges and the change propagates;
``tail`` for the full-precision layers after the last quantized one (upsampler, cuDNN), whose float16
rounding only reaches the output. Plans exist for the architectures whose
structure they know (IMDN, QuantSR-C / EDSR-style residual nets); every other packed model runs layer by
layer (:func:`tc_layer_forward`).

All functions are device-agnostic: kernels go through :class:`~engine_layers.EngineOps` (cupy on a GPU, the
CPU shim in tests), the full-precision layers through torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from quantsr_cli.backends import engine_plan as ep
from quantsr_cli.backends.engine_layers import EngineOps, TcLayer, code_out, prepare_tc, tc_unsupported

CL = torch.channels_last


@dataclass(frozen=True)
class Precision:
    """Float types of a plan: ``glue`` (between quantized layers), ``head`` / ``tail`` (the full-precision
    layers before the first / after the last quantized layer)."""

    glue: torch.dtype
    head: torch.dtype
    tail: torch.dtype

    @property
    def label(self) -> str:
        names = {torch.float16: "float16", torch.float32: "float32"}
        return f"glue {names[self.glue]}, head {names[self.head]}, tail {names[self.tail]}"


PRECISIONS = {
    "fp16": Precision(torch.float16, torch.float16, torch.float16),
    "mixed": Precision(torch.float32, torch.float32, torch.float16),
    "fp32": Precision(torch.float32, torch.float32, torch.float32),
}
"""Engine precisions: fp16 (fastest), mixed (float32 where values feed quantizers, float16 tail), fp32."""


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` channels-last tensor -> its memory as ``(N*H*W, C)`` (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


def nchw(buf: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """``(N*H*W, C)`` buffer -> ``(N, C, H, W)`` channels-last view."""
    return buf.view(n, h, w, buf.shape[1]).permute(0, 3, 1, 2)


def fp_copy(module: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A full-precision submodule in the engine's dtype, channels-last, on ``device`` (the model is untouched)."""
    return copy.deepcopy(module).to(device=device, dtype=dtype, memory_format=CL).eval()


class PlanUnsupported(ValueError):
    """The model does not have the structure a plan needs (the engine then runs it layer by layer)."""


def _tc(module: nn.Module, device: torch.device, c: int, o: int, ks: int) -> TcLayer:
    reason = tc_unsupported(module)
    if reason is not None:
        raise PlanUnsupported(reason)
    layer = prepare_tc(module, device)
    if (layer.c, layer.o, layer.ks) != (c, o, ks):
        raise PlanUnsupported(f"unexpected layer shape {(layer.c, layer.o, layer.ks)} != {(c, o, ks)}")
    return layer


def _epi(layer: TcLayer, **kw: Any) -> ep.Epilogue:
    return ep.Epilogue(layer.scale, layer.bias, **kw)


class ImdnPlan:
    """IMDN (``models/imdn.py``): per IMDB, c1..c3 write their 16 distilled channels (LeakyReLU) into a float
    concat buffer and the 48 remaining ones as the next conv's codes; c4 fills the last slice; the contrast
    channel attention is one stats kernel + the tiny FP MLP; c5's input quantizer multiplies by the attention;
    c5 adds the block input and writes the block output (float) plus the codes of the next block's c1 and of
    its slice of the fusion conv ``c.0``'s input; ``c.0`` (LeakyReLU) writes LR_conv's codes; LR_conv adds
    the head features. Head ``fea_conv`` and the upsampler run in torch in ``dtype``."""

    def __init__(self, model: nn.Module, device: torch.device, prec: Precision) -> None:
        if getattr(model, "arch", "") != "imdn":
            raise PlanUnsupported("not an IMDN")
        f = int(model.hparams["num_feat"])
        self.f, self.prec = f, prec
        blocks = [getattr(model, name) for name in model.block_names()]
        if not blocks or any(b.skip for b in blocks):
            raise PlanUnsupported("skipped blocks")
        d = blocks[0].distilled
        self.d, r = d, f - d
        self.blocks = []
        for b in blocks:
            self.blocks.append({
                "c1": _tc(b.c1, device, f, f, 3), "c2": _tc(b.c2, device, r, f, 3), "c3": _tc(b.c3, device, r, f, 3),
                "c4": _tc(b.c4, device, r, d, 3), "c5": _tc(b.c5, device, f, f, 1),
                "slope": float(b.act.negative_slope), "ls": float(b.learnable_shortcut.detach().reshape(-1)[0]),
                "cca": copy.deepcopy(b.cca.conv_du).to(device=device, dtype=torch.float32).eval(),
            })
        self.fuse = _tc(model.c[0], device, f * len(blocks), f, 1)
        self.fuse_slope = float(model.c[1].negative_slope)
        self.lr = _tc(model.LR_conv, device, f, f, 3)
        self.fea = fp_copy(model.fea_conv, prec.head, device)
        self.up = fp_copy(model.upsampler, prec.tail, device)

    def forward(self, ops: EngineOps, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        m, hw, f, d, dev = n * h * w, h * w, self.f, self.d, x.device
        fea = nhwc(self.fea(x.to(self.prec.head).contiguous(memory_format=CL)))
        u8 = {"dtype": torch.uint8, "device": dev}
        codes = ops.quant(fea, self.blocks[0]["c1"].act, m=m, hw=hw, c=f, x_ld=f)
        fea = fea.to(self.prec.glue)
        glue = {"dtype": self.prec.glue, "device": dev}
        cat = torch.empty((m, f), **glue)
        rem = [torch.empty((m, f - d), **u8) for _ in range(3)]
        cat_codes = torch.empty((m, f * len(self.blocks)), **u8)
        resid = fea
        size = {"n": n, "h": h, "w": w}
        for k, b in enumerate(self.blocks):
            leaky = {"act": ep.ACT_LEAKY, "slope": b["slope"]}
            src = codes
            for i, (name, nxt) in enumerate((("c1", "c2"), ("c2", "c3"), ("c3", "c4"))):
                ops.conv(b[name], src, _epi(b[name], **leaky, yf=cat, yf_ld=f, yf_off=i * d, yf_c0=0, yf_c1=d,
                                            q1=code_out(rem[i], b[nxt].act, c0=d, c1=f)), **size)
                src = rem[i]
            ops.conv(b["c4"], src, _epi(b["c4"], yf=cat, yf_ld=f, yf_off=3 * d, yf_c0=0, yf_c1=d), **size)
            mean, std = ops.channel_mean_std(cat, n=n, hw=hw, c=f, x_ld=f)
            att = b["cca"]((std + mean).float().view(n, f, 1, 1)).view(n, f).contiguous()
            q5 = ops.quant(cat, b["c5"].act, m=m, hw=hw, c=f, x_ld=f, mul=att)
            out = torch.empty((m, f), **glue)
            nxt_codes = None
            if k + 1 < len(self.blocks):
                codes = torch.empty((m, f), **u8)
                nxt_codes = code_out(codes, self.blocks[k + 1]["c1"].act, c0=0, c1=f)
            ops.conv(b["c5"], q5, _epi(b["c5"], res=resid, res_ld=f, res_coef=b["ls"], yf=out, yf_ld=f, yf_c1=f,
                                       q1=nxt_codes,
                                       q2=code_out(cat_codes, self.fuse.act.sliced(k * f, (k + 1) * f), c0=0,
                                                   c1=f, off=k * f)), **size)
            resid = out
        lr_codes = torch.empty((m, f), **u8)
        ops.conv(self.fuse, cat_codes, _epi(self.fuse, act=ep.ACT_LEAKY, slope=self.fuse_slope,
                                            q1=code_out(lr_codes, self.lr.act, c0=0, c1=f)), **size)
        lr = torch.empty((m, f), **glue)
        ops.conv(self.lr, lr_codes, _epi(self.lr, res=fea, res_ld=f, res_coef=1.0, yf=lr, yf_ld=f, yf_c1=f), **size)
        return self.up(nchw(lr, n, h, w).to(self.prec.tail))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The model's float32 output from :meth:`forward`'s (a new tensor: the runner calls it after a
        CUDA-graph replay, outside the graph)."""
        return y.float() if y.dtype != torch.float32 else y.clone()


class ResNetPlan:
    """QuantSR-C / EDSR-style (``models/quantsr_c.py``): per residual block, conv1 (ReLU) writes conv2's codes;
    conv2 (``res_scale`` folded in) adds ``learnable_shortcut * x`` and writes the block output (float) and the
    next block's codes. Head, ``conv_after_body`` + skip, upsampler and ``conv_last`` run in torch in ``dtype``."""

    def __init__(self, model: nn.Module, device: torch.device, prec: Precision) -> None:
        if getattr(model, "arch", "") != "quantsr-c":
            raise PlanUnsupported("not a QuantSR-C network")
        f = int(model.hparams["num_feat"])
        self.f, self.prec = f, prec
        self.blocks = []
        for b in model.body:
            ls = float(b.learnable_shortcut.detach().reshape(-1)[0])
            if b.skip:
                self.blocks.append({"skip": True, "ls": ls})
                continue
            self.blocks.append({"skip": False, "ls": ls, "conv1": _tc(b.conv1, device, f, f, 3),
                                "conv2": _tc(b.conv2, device, f, f, 3).scaled(float(b.res_scale))})
        self.mean = model.mean.detach().to(device, torch.float32)
        self.img_range = 255.0
        self.head = fp_copy(model.conv_first, prec.head, device)
        self.after = fp_copy(model.conv_after_body, prec.tail, device)
        self.up = fp_copy(model.upsample, prec.tail, device)
        self.last = fp_copy(model.conv_last, prec.tail, device)

    def forward(self, ops: EngineOps, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        m, hw, f, dev = n * h * w, h * w, self.f, x.device
        feat4 = self.head(((x - self.mean) * self.img_range).to(self.prec.head).contiguous(memory_format=CL))
        resid = nhwc(feat4)
        codes = None
        size = {"n": n, "h": h, "w": w}
        for i, b in enumerate(self.blocks):
            if b["skip"]:  # a QSA/DQA-skipped block: x * learnable_shortcut
                resid = (resid.float() * b["ls"]).to(self.prec.glue)
                codes = None
                continue
            if codes is None:
                codes = ops.quant(resid, b["conv1"].act, m=m, hw=hw, c=f, x_ld=f)
            resid = resid.to(self.prec.glue)
            mid = torch.empty((m, f), dtype=torch.uint8, device=dev)
            ops.conv(b["conv1"], codes, _epi(b["conv1"], act=ep.ACT_RELU,
                                             q1=code_out(mid, b["conv2"].act, c0=0, c1=f)), **size)
            nxt = self.blocks[i + 1] if i + 1 < len(self.blocks) else None
            codes, q1 = None, None
            if nxt is not None and not nxt["skip"]:
                codes = torch.empty((m, f), dtype=torch.uint8, device=dev)
                q1 = code_out(codes, nxt["conv1"].act, c0=0, c1=f)
            out = torch.empty((m, f), dtype=self.prec.glue, device=dev)
            ops.conv(b["conv2"], mid, _epi(b["conv2"], res=resid, res_ld=f, res_coef=b["ls"], yf=out, yf_ld=f,
                                           yf_c1=f, q1=q1), **size)
            resid = out
        res = self.after(nchw(resid, n, h, w).to(self.prec.tail)) + feat4.to(self.prec.tail)
        return self.last(self.up(res))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """``y / 255 + mean`` as a new float32 tensor, in one pass (outside the CUDA graph)."""
        return torch.add(self.mean, y, alpha=1.0 / self.img_range)


PLANS = (ImdnPlan, ResNetPlan)
"""Fused plans, tried in order; a model none of them accepts runs layer by layer."""


def build_plan(model: nn.Module, device: torch.device, prec: Precision) -> tuple[Any | None, str]:
    """(plan or None, a one-line note saying which engine path runs the model and why)."""
    reasons = []
    for cls in PLANS:
        try:
            return cls(model, device, prec), f"fused {cls.__name__} plan, {prec.label}"
        except PlanUnsupported as exc:
            reasons.append(f"{cls.__name__}: {exc}")
    return None, "layer by layer (" + "; ".join(reasons) + ")"


def tc_layer_forward(ops: EngineOps, quant_codes: Any, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One packed conv/linear through ``qsr_conv_tc`` with float32 output (the layer-by-layer path).

    ``quant_codes(x, strides, dims, act)`` returns the codes ``(N, H, W, C)`` of ``x`` seen as NCHW through
    ``strides`` (the exact strided quantize kernel). Returns the float32 output in the layer's usual layout
    (conv: an NCHW view of channels-last memory)."""
    layer = prepare_tc(module, x.device)
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    if layer.ks == 3 or hasattr(module, "kernel_size"):
        n, c, h, w = x.shape
        codes = quant_codes(x, tuple(int(s) for s in x.stride()), (n, c, h, w), layer.act)
        y = torch.empty((n * h * w, layer.o), dtype=torch.float32, device=x.device)
        ops.conv(layer, codes, _epi(layer, yf=y, yf_ld=layer.o, yf_c1=layer.o), n=n, h=h, w=w)
        return nchw(y, n, h, w)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    rows = flat.shape[0]
    if rows == 0:
        return x.new_zeros((*lead, layer.o))
    codes = quant_codes(flat, (int(flat.stride(0)), int(flat.stride(1)), 0, 0), (rows, layer.c, 1, 1), layer.act)
    y = torch.empty((rows, layer.o), dtype=torch.float32, device=x.device)
    ops.conv(layer, codes, _epi(layer, yf=y, yf_ld=layer.o, yf_c1=layer.o), n=rows, h=1, w=1)
    return y.reshape(*lead, layer.o)

"""The ``cpu`` backend: integer arithmetic on the codes with oneDNN int8 kernels (x86).

Per packed conv/linear layer:

* **Activations** are quantized by the layer's own quantizer, with the same float ops as the
  reference (``round((x + shift) / step)`` clamped to ``[qmin, qmax]``), then stored as ``uint8``
  codes ``c - qmin`` with zero point ``-qmin`` in a channels-last buffer: the integer inputs are
  exactly those of the reference. The elementwise passes run on ~2 MiB slices so they stay in cache
  (on this memory-bound 2-core machine that halves their cost).
* **Weights** become ``int8`` ``u - zero`` once, at :func:`prepare` time (a half-integer zero, as in
  DoReFa, is doubled: ``2u - 2zero`` with the scale halved, still exact) and are prepacked for oneDNN.
* ``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise`` accumulate ``sum(c * w)`` in int32
  and return float32 ``acc * step * scale[o] + bias`` directly (no requantization), so the result
  differs from the reference only by float32 rounding (tested to <= 1e-4).

A layer falls back to the reference (recorded in ``module.backend_note``) when: its input is not
quantized (``a_bits == 32``), its weight zero is neither integer nor half-integer, ``u - zero`` does
not fit int8, the u8 x s8 pair sums could saturate int16 (AVX2 ``vpmaddubsw``:
``2 * (qmax - qmin) * max|w| > 32767``, e.g. W8A8), the padding is a string, oneDNN is missing,
or the input is not a CPU tensor / needs gradients.

Model-wide, full-precision ``nn.Conv2d`` layers get a forward pre-hook that makes their input
channels-last (oneDNN's fast layout; same float32 math), since the int8 layers output channels-last.

Whole-model outputs match the reference only up to rare code flips: a float32 rounding difference
(summation order) that lands on a quantizer's rounding boundary changes one code by 1, and deep
networks propagate it. Per layer, for the same input, the result is within float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantsr_cli.packing.modules import (
    Impl,
    PackedConv2d,
    PackedLinear,
    PackedModule,
    reference_forward,
    tensor_key,
)

NAME = "cpu"
_CL = torch.channels_last
_HOOKS_ATTR = "_quantsr_cpu_hooks"


def onednn_available() -> bool:
    """True when this torch build has the oneDNN int8 conv/linear ops."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _int_weight(module: PackedConv2d | PackedLinear) -> tuple[torch.Tensor, torch.Tensor] | str:
    """int8 weight (original shape) and per-channel float32 scales, or the reason it is unsupported."""
    zero = module.w_zero
    if not math.isfinite(zero):
        return f"weight zero {zero} is not finite"
    factor = 1 if zero == math.floor(zero) else 2 if 2 * zero == math.floor(2 * zero) else 0
    if not factor:
        return f"weight zero {zero} is neither integer nor half-integer"
    w = factor * module.codes().to(torch.int32) - int(factor * zero)
    if int(w.min()) < -128 or int(w.max()) > 127:
        return f"u - zero spans [{int(w.min())}, {int(w.max())}], not int8"
    span = module.a_qmax - module.a_qmin
    if 2 * span * int(w.abs().max()) > 32767:
        return "u8 x s8 pair sums could saturate int16 (use W<=4 or A<=4)"
    scale = module.w_scale.to(torch.float32).expand(module.weight_shape[0]) / factor
    w8 = w.to(torch.int8)
    if isinstance(module, PackedConv2d):
        o, i, kh, kw = module.weight_shape
        w8 = w8.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return w8, scale.contiguous()


def _build_state(module: PackedModule) -> dict[str, Any] | str:
    """Prepacked oneDNN weight and constants for ``module``, or why it must use the reference."""
    if not isinstance(module, PackedConv2d | PackedLinear):
        return "activation point (float fake-quant is already the cheapest)"
    if module.a_bits >= 32:
        return "float input (a_bits=32)"
    if not (0 <= -module.a_qmin <= 255 and module.a_qmax - module.a_qmin <= 255):
        return f"activation codes [{module.a_qmin}, {module.a_qmax}] do not fit uint8 with an offset"
    if module.qweight.device.type != "cpu":
        return "the layer is not on the CPU"
    if not onednn_available():
        return "this torch build has no oneDNN int8 ops"
    if isinstance(module, PackedConv2d) and isinstance(module.padding, str):
        return f"padding={module.padding!r}"
    weight = _int_weight(module)
    if isinstance(weight, str):
        return weight
    w8, scale = weight
    x_scale, x_zp = float(module.a_step), -module.a_qmin
    try:
        if isinstance(module, PackedConv2d):
            packed = torch.ops.onednn.qconv_prepack(
                w8, scale, x_scale, x_zp, list(module.stride), list(module.padding),
                list(module.dilation), module.groups, None,
            )
        else:
            packed = torch.ops.onednn.qlinear_prepack(w8, None)
    except RuntimeError as exc:
        return f"oneDNN refused the layer ({str(exc).splitlines()[0][:120]})"
    zps = torch.zeros(scale.numel(), dtype=torch.int64)
    bias = None if module.bias is None else module.bias.detach().to(torch.float32).contiguous()
    return {"packed": packed, "scale": scale, "zps": zps, "bias": bias, "x_scale": x_scale, "x_zp": x_zp}


def _state(module: PackedModule) -> dict[str, Any] | str:
    if not isinstance(module, PackedConv2d | PackedLinear):
        return _build_state(module)
    key = tensor_key(module.qweight, module.w_scale, module.a_step, module.bias)
    return module.cached("cpu", key, lambda: _build_state(module))


_CHUNK_BYTES = 2 << 20
"""Float32 bytes quantized per slice: the five elementwise passes then run in cache, not DRAM."""


def _input_codes(module: PackedModule, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """uint8 codes ``clamp(round((x + shift) / step), qmin, qmax) - qmin`` (channels-last for 4-D x).

    The same float ops as the reference, applied slice by slice (rows of ``H`` for conv inputs, rows
    of ``x`` for linear inputs) through a small float buffer.
    """
    fmt = _CL if x.dim() == 4 else torch.contiguous_format
    dim = 2 if x.dim() == 4 else 0
    codes = torch.empty(x.shape, dtype=torch.uint8, memory_format=fmt)
    size = x.shape[dim]
    if codes.numel() == 0:
        return codes
    rows = max(1, min(size, _CHUNK_BYTES // (4 * x.numel() // size)))
    tmp_shape = list(x.shape)
    tmp_shape[dim] = rows
    tmp = torch.empty(tmp_shape, dtype=torch.float32, memory_format=fmt)
    shift = None
    if module.a_shift is not None:
        view = [1] * x.dim()
        view[channel_dim] = -1
        shift = module.a_shift.view(view)
    for start in range(0, size, rows):
        n = min(rows, size - start)
        src, buf = x.narrow(dim, start, n), tmp.narrow(dim, 0, n)
        if shift is not None:
            torch.add(src, shift, out=buf)
            buf.div_(module.a_step)
        else:
            torch.div(src, module.a_step, out=buf)
        buf.round_().clamp_(module.a_qmin, module.a_qmax)
        if module.a_qmin:
            buf.sub_(module.a_qmin)
        codes.narrow(dim, start, n).copy_(buf)
    return codes


def cpu_forward(module: PackedModule, x: torch.Tensor) -> torch.Tensor:
    """``impl`` of supported layers: oneDNN int8 conv/linear with a float32 output."""
    state = _state(module)
    if isinstance(state, str) or x.device.type != "cpu" or x.dtype != torch.float32 or (
        torch.is_grad_enabled() and x.requires_grad
    ):
        return module.reference(x)
    if isinstance(module, PackedConv2d):
        codes = _input_codes(module, x, 1)
        return torch.ops.onednn.qconv2d_pointwise(
            codes, state["x_scale"], state["x_zp"], state["packed"], state["scale"], state["zps"], state["bias"],
            list(module.stride), list(module.padding), list(module.dilation), module.groups,
            1.0, 0, torch.float32, "none", [], "",
        )
    lead = x.shape[:-1]
    codes = _input_codes(module, x.reshape(-1, x.shape[-1]), -1)
    out = torch.ops.onednn.qlinear_pointwise(
        codes, state["x_scale"], state["x_zp"], state["packed"], state["scale"], state["zps"], state["bias"],
        1.0, 0, torch.float32, "none", [], "",
    )
    return out.reshape(*lead, out.shape[-1])


def unavailable_reason() -> str | None:
    """Always available: without oneDNN (or for an unsupported layer) a layer runs the reference."""
    return None


def prepare(module: PackedModule) -> Impl:
    """Prepack ``module``'s weight; return :func:`cpu_forward`, or the reference when unsupported."""
    state = _state(module)
    if isinstance(state, str):
        module.backend_note = f"cpu: reference fallback ({state})"
        return reference_forward
    module.backend_note = "cpu: oneDNN int8"
    return cpu_forward


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if torch.is_tensor(x) and x.dim() == 4 and x.device.type == "cpu" and not x.is_contiguous(memory_format=_CL):
        return (x.contiguous(memory_format=_CL), *args[1:])
    return None


def prepare_model(model: nn.Module) -> None:
    """Make full-precision convs take channels-last inputs (forward pre-hooks, removable)."""
    release_model(model)
    hooks = [
        m.register_forward_pre_hook(_channels_last_input)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, PackedModule)
    ]
    object.__setattr__(model, _HOOKS_ATTR, hooks)


def release_model(model: nn.Module) -> None:
    """Remove the hooks :func:`prepare_model` added."""
    for handle in model.__dict__.pop(_HOOKS_ATTR, []):
        handle.remove()


def layer_report(model: nn.Module) -> dict[str, str]:
    """Packed layer name -> how the backend runs it (``backend_note``)."""
    return {n: getattr(m, "backend_note", "") for n, m in model.named_modules() if isinstance(m, PackedModule)}

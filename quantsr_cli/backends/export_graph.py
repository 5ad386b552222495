"""Export modules: packed layers written as ONNX QuantizeLinear/DequantizeLinear around float ops.

:func:`export_copy` returns a copy of a model in which every packed (or QAT) conv/linear and every
activation point is replaced by an ``_Export*`` module. In eager mode these compute the reference
forward; while ``torch.onnx.export`` traces them they emit, through ``torch.onnx.ops.symbolic``:

* **activations** (``a_bits < 32``): ``Min(x, qmax*step - shift)`` (when ``qmax`` is below the
  container's top) -> ``Add(shift)`` (if any) -> ``QuantizeLinear(step, zero point -qmin)`` (its
  saturation at 0 is the lower clamp) ->
  ``DequantizeLinear`` -- exactly ``step * clamp(round((x + shift) / step), qmin, qmax)`` (ONNX
  rounds half to even, like ``torch.round``). The container is uint8 with zero point ``-qmin``.
* **weights**: an int8 constant ``v = f * (u - zero)`` (``f = 2`` for a half-integer zero, scale
  halved; int32 when ``v`` does not fit) -> ``DequantizeLinear(scale / f)`` (per tensor, or per output
  channel on axis 0). Zero points are 0: OpenVINO's CPU plugin runs a convolution in u8 only for
  symmetric (zero-point-free) weights.
* the float conv/linear on the two dequantized tensors, then the float bias.

Why 8-bit containers, not ONNX's INT4/UINT4 (checked with onnxruntime 1.32 / OpenVINO 2026.4):
ONNX Runtime fuses ``DQ -> Conv -> (Relu) -> Q`` into ``QLinearConv`` also for uint4 tensors and then
rejects the graph ("tensor(uint4) of QLinearConv is invalid"), and its Clip+QuantizeLinear fusion
throws on 4-bit zero points; OpenVINO's CPU plugin ran a 1x1 convolution with INT4 weights in f32.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.errors import ConfigError
from quantsr_cli.packing.convert import is_act_point, is_qat_layer, quantized_layers
from quantsr_cli.packing.modules import PackedActQuant, PackedConv2d, PackedLinear, PackedModule

ONNX_UINT8, ONNX_INT8, ONNX_INT32 = 2, 3, 6


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export())


def _symbolic(op: str, inputs: tuple[torch.Tensor, ...], dtype: int | torch.dtype, like: torch.Tensor,
              attrs: dict[str, int] | None = None, version: int = 21) -> torch.Tensor:
    return torch.onnx.ops.symbolic(op, inputs, attrs or {}, dtype=dtype, shape=like.shape, version=version)


class _ActQDQ(nn.Module):
    """``step * clamp(round((x + shift) / step), qmin, qmax)`` as (Min) -> (Add) -> Q -> DQ."""

    def __init__(self, src: PackedModule, shift_dim: int) -> None:
        super().__init__()
        self.qmin, self.qmax, self.shift_dim = src.a_qmin, src.a_qmax, shift_dim
        self.flavor = "onnx"
        if not (0 <= -src.a_qmin <= 255 and src.a_qmax - src.a_qmin <= 255):
            raise ConfigError(f"activation codes [{src.a_qmin}, {src.a_qmax}] do not fit an 8-bit container")
        # uint8 with zero point -qmin for signed codes too: u8 x s8 is what x86 int8 kernels run fastest
        self.container, zp, lo, hi = ONNX_UINT8, -src.a_qmin, src.a_qmin, src.a_qmin + 255
        self.clip = (lo, hi) != (src.a_qmin, src.a_qmax)
        step = src.a_step.detach().float().reshape(())
        self.register_buffer("step", step.clone())
        self.register_buffer("zp", torch.tensor(zp, dtype=torch.uint8))
        self.register_buffer("lo", (step * src.a_qmin).clone())
        self.register_buffer("hi", (step * src.a_qmax).clone())
        shift = None if src.a_shift is None else src.a_shift.detach().float().clone()
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = None
        if self.shift is not None:
            view = [1] * x.dim()
            view[self.shift_dim] = -1
            shift = self.shift.view(view)
        if not _exporting():
            x = x if shift is None else x + shift
            return self.step * torch.clamp(torch.round(x / self.step), self.qmin, self.qmax)
        if self.flavor == "openvino":
            return self._fake_quantize(x, shift)
        # QuantizeLinear's uint8 saturation at 0 (zero point -qmin) is the lower clamp; the upper one is
        # min(x + s, hi), written min(x, hi - s) + s: OpenVINO 2026.4's CPU plugin computes Add -> Clamp
        # (or Minimum) -> FakeQuantize wrongly (it moves the Add past the clamp); Minimum -> Add is right.
        if self.clip:
            x = torch.minimum(x, self.hi if shift is None else self.hi - shift)
        if shift is not None:
            x = x + shift
        q = _symbolic("QuantizeLinear", (x, self.step, self.zp), self.container, x)
        return _symbolic("DequantizeLinear", (q, self.step, self.zp), torch.float32, x)


    def _fake_quantize(self, x: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """OpenVINO ``FakeQuantize`` with the shift in its per-channel input range, 16 or 256 levels.

        Its CPU plugin runs the next convolution in u8 only for 16/256 levels, so a narrower code range
        (2-bit) keeps the 16-level grid of the same step and is clamped above first (Minimum).
        """
        levels = self.qmax - self.qmin + 1
        grid = levels if levels in (16, 256) else 16 if levels < 16 else 256
        neg = -shift if shift is not None else torch.zeros((), dtype=x.dtype)
        low, top = self.lo + neg, self.step * (self.qmin + grid - 1)
        if grid != levels:  # the FakeQuantize clamps below at qmin itself
            x = torch.minimum(x, self.hi + neg)
        return _symbolic("org.openvinotoolkit::FakeQuantize", (x, low, top + neg, self.lo, top), torch.float32, x,
                         {"levels": grid}, version=1)


class _WeightDQ(nn.Module):
    """The dequantized weight ``scale * (u - zero)`` as a DequantizeLinear of an integer constant."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: float) -> None:
        super().__init__()
        factor = 1 if zero == math.floor(zero) else 2 if 2 * zero == math.floor(2 * zero) else 0
        if not factor or not math.isfinite(zero):
            raise ConfigError(f"weight zero {zero} is neither an integer nor a half-integer")
        values = factor * codes.to(torch.int32) - int(factor * zero)
        lo, hi = int(values.min()), int(values.max())
        self.container = ONNX_INT8 if -128 <= lo and hi <= 127 else ONNX_INT32
        self.register_buffer("values", values.to(torch.int32 if self.container == ONNX_INT32 else torch.int8))
        scale = scale.detach().float().reshape(-1) / factor
        self.axis = 0 if scale.numel() > 1 else None
        self.register_buffer("scale", scale if self.axis == 0 else scale.reshape(()))

    def forward(self) -> torch.Tensor:
        if not _exporting():
            view = [-1] + [1] * (self.values.dim() - 1) if self.axis == 0 else []
            return self.scale.view(view) * self.values.float()
        attrs = {"axis": 0} if self.axis == 0 else {}
        return _symbolic("DequantizeLinear", (self.values, self.scale), torch.float32, self.values, attrs)


class _ExportConv2d(nn.Module):
    def __init__(self, src: PackedConv2d) -> None:
        super().__init__()
        self.act = _ActQDQ(src, 1) if src.a_bits < 32 else None
        self.weight = _WeightDQ(src.codes().reshape(src.weight_shape[0], *src.kernel_size, -1)
                                .permute(0, 3, 1, 2).contiguous(), src.w_scale, src.w_zero)
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().float().clone())
        self.stride, self.padding, self.dilation, self.groups = src.stride, src.padding, src.dilation, src.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act is None else self.act(x)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class _ExportLinear(nn.Module):
    def __init__(self, src: PackedLinear) -> None:
        super().__init__()
        self.act = _ActQDQ(src, -1) if src.a_bits < 32 else None
        self.weight = _WeightDQ(src.codes(), src.w_scale, src.w_zero)
        self.register_buffer("bias", None if src.bias is None else src.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.act is None else self.act(x)
        return F.linear(x, self.weight(), self.bias)


class _ExportFloatWeight(nn.Module):
    """A QAT layer with full-precision weights (W32) but a quantized input."""

    def __init__(self, layer: nn.Module, act: PackedActQuant) -> None:
        super().__init__()
        self.layer = layer
        self.act = _ActQDQ(act, 1 if isinstance(layer, nn.Conv2d) else -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(x, self.layer.weight, self.layer.bias, self.layer.stride, self.layer.padding,
                            self.layer.dilation, self.layer.groups)
        return F.linear(x, self.layer.weight, self.layer.bias)


class _ExportAct(nn.Module):
    def __init__(self, src: PackedActQuant) -> None:
        super().__init__()
        self.act = _ActQDQ(src, src.shift_dim) if src.a_bits < 32 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act is None else self.act(x)


def _export_module(name: str, module: nn.Module) -> nn.Module:
    if isinstance(module, PackedConv2d):
        if isinstance(module.padding, str):
            raise ConfigError(f"layer {name}: padding={module.padding!r} cannot be exported")
        return _ExportConv2d(module)
    if isinstance(module, PackedLinear):
        return _ExportLinear(module)
    if isinstance(module, PackedActQuant):
        return _ExportAct(module)
    if is_qat_layer(module):  # fake-quant layer: through its packed twin (same forward by contract)
        if callable(getattr(module.w_q, "export", None)):
            packed = (PackedConv2d if isinstance(module, nn.Conv2d) else PackedLinear).from_qat(module)
            return _export_module(name, packed)
        act = getattr(module, "act_q", None)
        plain = copy.copy(module)
        if act is None:
            return plain
        return _ExportFloatWeight(plain, PackedActQuant.from_qat(act))
    if is_act_point(module):
        return _ExportAct(PackedActQuant.from_qat(module))
    raise TypeError(f"{name}: {type(module).__name__} is not a quantized layer")


def export_copy(model: nn.Module, flavor: str = "onnx") -> nn.Module:
    """A CPU, eval-mode deep copy of ``model`` whose quantized layers are export modules.

    Works for packed, fake-quant (QAT) and float models; same forward as the ``torch`` backend.
    ``flavor``: ``"onnx"`` (standard QuantizeLinear/DequantizeLinear) or ``"openvino"`` (activations
    as ``org.openvinotoolkit::FakeQuantize``, which OpenVINO's ONNX reader turns into its own op).
    """
    if flavor not in ("onnx", "openvino"):
        raise ValueError(f"flavor={flavor!r}")
    model = copy.deepcopy(model).cpu().eval()
    for name, module in [*quantized_layers(model),
                         *[(n, m) for n, m in model.named_modules() if isinstance(m, PackedModule)]]:
        if not name:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if getattr(parent, child) is module:
            setattr(parent, child, _export_module(name, module))
    for module in model.modules():
        if isinstance(module, _ActQDQ):
            module.flavor = flavor
    return model

"""Packed inference modules: bit-packed weight codes plus the activation quantizer's parameters.

``PackedConv2d`` / ``PackedLinear`` replace a QAT ``QConv2d`` / ``QLinear`` and ``PackedActQuant`` an
``ActQuant`` activation point. ``forward(x)`` calls ``self.impl(self, x)``; a backend
(:mod:`quantsr_cli.backends`) sets ``impl``. The default, :func:`reference_forward`, is the oracle:

1. input fake-quantization ``x_hat = step * clamp(round((x + shift) / step), qmin, qmax)``
   (skipped when ``a_bits == 32``),
2. unpack the codes and dequantize ``w = scale * (u - zero)`` (cached as float32 on first use),
3. ``F.conv2d`` / ``F.linear`` in float32.

Buffers (state-dict keys): ``qweight`` uint8 ``(O, ceil(K*b/8))``, ``w_scale`` float32 ``(1,)`` or
``(O,)``, ``a_step`` float32 ``(1,)``, ``a_shift`` float32 ``(C_in,)`` (optional) and ``bias`` float32
``(O,)`` (optional). Python attributes: ``w_bits``, ``w_zero``, ``a_bits``, ``a_qmin``, ``a_qmax`` and
the conv geometry; :meth:`spec` returns them as the JSON-able dict stored in file metadata.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.packing.layout import (
    PackFormat,
    conv_weight_to_rows,
    pack_codes,
    packed_row_bytes,
    rows_to_conv_weight,
    unpack_codes,
)

Impl = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def reference_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Default ``impl`` of every packed module: the float reference (see the module docstring)."""
    return module.reference(x)  # type: ignore[operator]


def fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    qmin: int,
    qmax: int,
    shift: torch.Tensor | None,
    shift_dim: int,
) -> torch.Tensor:
    """``step * clamp(round((x + shift) / step), qmin, qmax)``, bit-identical to the QAT quantizer.

    Args:
        x: activations, any shape; float32.
        step: float32 ``(1,)`` quantization step (> 0).
        qmin, qmax: code range, e.g. ``-8, 7`` (signed 4-bit) or ``0, 15`` (unsigned 4-bit).
        shift: float32 ``(C,)`` per-channel shift along ``shift_dim``, or None.
        shift_dim: the channel dim of ``x`` (1 for conv inputs, -1 for linear inputs).
    """
    if shift is not None:
        x = x + _channel_view(shift, x.dim(), shift_dim)
    return step * torch.clamp(torch.round(x / step), qmin, qmax)


def _channel_view(vec: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return vec.view(shape)


def _act_params(act_q: nn.Module | None) -> tuple[int, torch.Tensor, int, int, torch.Tensor | None]:
    """Read ``act_q.export()`` (attributes only) -> (bits, step (1,), qmin, qmax, shift or None)."""
    if act_q is None:
        return 32, torch.ones(1), 0, 0, None
    p = act_q.export()
    bits = int(p.bits)
    if bits >= 32:
        return 32, torch.ones(1), 0, 0, None
    step = torch.as_tensor(p.step, dtype=torch.float32).detach().reshape(1).clone()
    shift = None if p.shift is None else torch.as_tensor(p.shift, dtype=torch.float32).detach().reshape(-1).clone()
    return bits, step, int(p.qmin), int(p.qmax), shift


def _weight_bits(layer: nn.Module) -> int:
    """The weight quantizer's bit-width (``w_q.bits``, set from the ``QuantConfig``): the codes are
    packed at the bits the quantizer says, never at bits guessed from their values."""
    bits = getattr(layer.w_q, "bits", None)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 4, 8):
        raise ValueError(f"{type(layer.w_q).__name__}.bits is {bits!r}; a weight quantizer must state its "
                         "bit-width (2, 4 or 8)")
    return bits


def _export_spec(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(codes, scale, spec)`` of a QAT conv/linear: its exported weight and the shared spec fields."""
    with torch.no_grad():
        codes, scale, zero = layer.w_q.export(layer.weight)
    a_bits, _, qmin, qmax, shift = _act_params(getattr(layer, "act_q", None))
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    spec = {
        "shape": list(layer.weight.shape), "w_bits": _weight_bits(layer), "w_zero": float(zero),
        "per_channel": scale.numel() > 1, "bias": layer.bias is not None, "a_bits": a_bits,
        "a_qmin": qmin, "a_qmax": qmax, "shift": 0 if shift is None else shift.numel(),
    }
    return codes, scale, spec


class _PackedBase(nn.Module):
    """Shared buffers, activation quantization and caches of packed modules."""

    kind = ""

    def __init__(self, a_bits: int, a_qmin: int, a_qmax: int, shift_channels: int, shift_dim: int) -> None:
        super().__init__()
        self.a_bits = int(a_bits)
        self.a_qmin = int(a_qmin)
        self.a_qmax = int(a_qmax)
        self.shift_dim = int(shift_dim)
        self.register_buffer("a_step", torch.ones(1))
        self.register_buffer("a_shift", torch.zeros(shift_channels) if shift_channels else None)
        self.impl: Impl = reference_forward
        self._cache: dict[str, tuple[Any, Any]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.impl(self, x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with this layer's activation parameters (identity when ``a_bits == 32``)."""
        if self.a_bits >= 32:
            return x
        return fake_quantize(x, self.a_step, self.a_qmin, self.a_qmax, self.a_shift, self.shift_dim)

    def cached(self, name: str, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """Return ``build()``, memoised under ``name`` until ``key`` changes (e.g. a buffer is reloaded)."""
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._cache[name] = (key, value)
        return value

    def clear_cache(self) -> None:
        """Drop derived tensors (dequantized weights, backend-packed weights)."""
        self._cache = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def side_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """The float side buffers present, in file order: ``w_scale, a_step, a_shift, bias``."""
        names = ("w_scale", "a_step", "a_shift", "bias")
        return [(n, getattr(self, n)) for n in names if getattr(self, n, None) is not None]

    def _act_spec(self) -> dict[str, Any]:
        return {
            "a_bits": self.a_bits,
            "a_qmin": self.a_qmin,
            "a_qmax": self.a_qmax,
            "shift": 0 if self.a_shift is None else int(self.a_shift.numel()),
        }


def tensor_key(*tensors: torch.Tensor | None) -> tuple[Any, ...]:
    """Cache key that changes when any tensor is replaced, moved or modified in place."""
    # Inference tensors (made under torch.inference_mode, e.g. a model moved to CUDA there) have no version
    # counter; they cannot be modified in place outside inference mode, so pointer + device identify them.
    return tuple(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version, str(t.device))
                 for t in tensors)


class _PackedWeight(_PackedBase):
    """Weight-carrying packed layer (conv or linear)."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        w_bits: int,
        w_zero: float,
        per_channel: bool,
        has_bias: bool,
        a_bits: int,
        a_qmin: int,
        a_qmax: int,
        shift_channels: int,
        shift_dim: int,
    ) -> None:
        super().__init__(a_bits, a_qmin, a_qmax, shift_channels, shift_dim)
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.w_bits = int(w_bits)
        self.w_zero = float(w_zero)
        self.format = PackFormat.for_bits(self.w_bits)
        out = self.weight_shape[0]
        self.k = math.prod(self.weight_shape[1:])
        nbytes = packed_row_bytes(self.k, self.w_bits)
        self.register_buffer("qweight", torch.zeros(out, nbytes, dtype=torch.uint8))
        self.register_buffer("w_scale", torch.ones(out if per_channel else 1))
        self.register_buffer("bias", torch.zeros(out) if has_bias else None)

    def codes(self) -> torch.Tensor:
        """Unsigned codes, uint8 ``(O, K)`` in row (OHWI for conv) order."""
        return unpack_codes(self.qweight, self.w_bits, self.k)

    def _rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def dequantized_weight(self) -> torch.Tensor:
        """``scale * (codes - zero)`` as float32 in the float layer's weight shape; cached."""

        def build() -> torch.Tensor:
            scale = self.w_scale.view(-1, 1)
            rows = scale * (self.codes().to(torch.float32) - self.w_zero)
            return self._rows_to_weight(rows)

        return self.cached("dequant", tensor_key(self.qweight, self.w_scale), build)

    def _weight_spec(self) -> dict[str, Any]:
        return {
            "format": self.format.value,
            "shape": list(self.weight_shape),
            "w_bits": self.w_bits,
            "w_zero": self.w_zero,
            "per_channel": self.w_scale.numel() > 1,
            "bias": self.bias is not None,
        }

    def _load_export(self, layer: nn.Module, rows: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        with torch.no_grad():
            self.qweight.copy_(pack_codes(rows.to(torch.uint8), self.w_bits))
            self.w_scale.copy_(scale.reshape(-1))
            if bias is not None:
                self.bias.copy_(bias.detach())
            _, step, _, _, shift = _act_params(getattr(layer, "act_q", None))
            self.a_step.copy_(step)
            if shift is not None:
                self.a_shift.copy_(shift)

    def extra_repr(self) -> str:
        return f"{list(self.weight_shape)}, W{self.w_bits} A{self.a_bits}, zero={self.w_zero:g}"


class PackedConv2d(_PackedWeight):
    """A quantized 2-D convolution with bit-packed weights.

    Input ``(N, C_in, H, W)`` float32, output ``(N, C_out, H', W')`` float32 (same geometry as the
    ``nn.Conv2d`` it replaces; ``padding_mode='zeros'`` only).

    Args:
        spec: a metadata ``layers`` entry (see :meth:`spec`): ``shape`` ``[O, I/groups, kh, kw]``,
            ``w_bits``, ``w_zero``, ``per_channel``, ``bias``, ``a_bits``, ``a_qmin``, ``a_qmax``,
            ``shift`` (channels, 0 = none) and optional ``stride``/``padding``/``dilation``/``groups``.
            Buffers start zeroed; fill them with ``load_state_dict`` or use :meth:`from_qat`.
    """

    kind = "conv2d"

    def __init__(self, spec: dict[str, Any]) -> None:
        shape = tuple(spec["shape"])
        super().__init__(
            shape, spec["w_bits"], spec["w_zero"], spec["per_channel"], spec["bias"],
            spec["a_bits"], spec["a_qmin"], spec["a_qmax"], spec["shift"], 1,
        )
        self.groups = int(spec.get("groups", 1))
        self.out_channels = shape[0]
        self.in_channels = shape[1] * self.groups
        self.kernel_size = (shape[2], shape[3])
        self.stride = tuple(spec.get("stride", (1, 1)))
        pad = spec.get("padding", (0, 0))
        self.padding = pad if isinstance(pad, str) else tuple(pad)
        self.dilation = tuple(spec.get("dilation", (1, 1)))

    def _rows_to_weight(self, rows: torch.Tensor) -> torch.Tensor:
        return rows_to_conv_weight(rows, self.weight_shape)

    def spec(self) -> dict[str, Any]:
        """JSON-able description (metadata ``layers`` entry without ``name``)."""
        return {
            "type": self.kind, **self._weight_spec(), **self._act_spec(),
            "stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
        }

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Float reference forward (the oracle every backend is tested against)."""
        return F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_qat(cls, layer: nn.Conv2d) -> PackedConv2d:
        """Build from a QAT ``QConv2d`` through ``w_q.export`` / ``act_q.export`` (exact same forward)."""
        if layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode={layer.padding_mode!r} is not supported by packed convs")
        codes, scale, spec = _export_spec(layer)
        spec.update({"stride": list(layer.stride), "dilation": list(layer.dilation), "groups": layer.groups,
                     "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding)})
        module = cls(spec).to(layer.weight.device)
        module._load_export(layer, conv_weight_to_rows(codes), scale, layer.bias)
        return module


class PackedLinear(_PackedWeight):
    """A quantized linear layer with bit-packed weights: ``(..., I)`` -> ``(..., O)`` float32.

    Args:
        spec: as for :class:`PackedConv2d` with ``shape`` ``[O, I]`` and no conv geometry.
    """

    kind = "linear"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(
            tuple(spec["shape"]), spec["w_bits"], spec["w_zero"], spec["per_channel"], spec["bias"],
            spec["a_bits"], spec["a_qmin"], spec["a_qmax"], spec["shift"], -1,
        )
        self.out_features, self.in_features = self.weight_shape

    def spec(self) -> dict[str, Any]:
        """JSON-able description (metadata ``layers`` entry without ``name``)."""
        return {"type": self.kind, **self._weight_spec(), **self._act_spec()}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Float reference forward (the oracle every backend is tested against)."""
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)

    @classmethod
    def from_qat(cls, layer: nn.Linear) -> PackedLinear:
        """Build from a QAT ``QLinear`` through ``w_q.export`` / ``act_q.export``."""
        codes, scale, spec = _export_spec(layer)
        module = cls(spec).to(layer.weight.device)
        module._load_export(layer, codes.contiguous(), scale, layer.bias)
        return module


class PackedActQuant(_PackedBase):
    """An activation point (e.g. attention q/k/v or softmax output): ``x -> x_hat``, same shape.

    Args:
        spec: ``a_bits``, ``a_qmin``, ``a_qmax``, ``shift`` (channels, 0 = none) and ``shift_dim``, the
            dim the optional per-channel shift runs along (default -1, the last).
    """

    kind = "act"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec["a_bits"], spec["a_qmin"], spec["a_qmax"], spec["shift"], spec.get("shift_dim", -1))

    def spec(self) -> dict[str, Any]:
        """JSON-able description (metadata ``layers`` entry without ``name``)."""
        return {"type": self.kind, **self._act_spec(), "shift_dim": self.shift_dim}

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` exactly like the QAT ``ActQuant``."""
        return self.quantize_input(x)

    @classmethod
    def from_qat(cls, act_quant: nn.Module) -> PackedActQuant:
        """Build from a QAT ``ActQuant`` through ``export()``."""
        with torch.no_grad():
            a_bits, step, qmin, qmax, shift = _act_params(act_quant)
        dim = int(getattr(act_quant, "shift_dim", getattr(act_quant, "channel_dim", -1)))
        spec = {"a_bits": a_bits, "a_qmin": qmin, "a_qmax": qmax,
                "shift": 0 if shift is None else shift.numel(), "shift_dim": dim}
        module = cls(spec).to(step.device)
        with torch.no_grad():
            module.a_step.copy_(step)
            if shift is not None:
                module.a_shift.copy_(shift)
        return module


PACKED_TYPES: dict[str, type[_PackedBase]] = {
    PackedConv2d.kind: PackedConv2d,
    PackedLinear.kind: PackedLinear,
    PackedActQuant.kind: PackedActQuant,
}
"""Metadata ``type`` -> packed module class."""

PackedModule = _PackedBase
"""Common base class of the packed modules (for ``isinstance`` checks)."""

"""Launch plans of the engine kernels (``kernels/qsr_conv_tc.cu``, ``kernels/qsr_engine_ops.cu``).

Pure Python, like :mod:`quantsr_cli.backends.cupy_plan`: the cupy engine turns a :class:`~cupy_plan.Launch`
into an NVRTC-compiled kernel call, and the CPU-shim tests run the same plans through the same sources
compiled with g++. Nothing here touches a GPU.

* :class:`TcSpec`: one compile-time specialisation of ``qsr_conv_tc`` (input channels, kernel size, output
  channels per CTA, warps, signedness of the input codes, float32 or binary16 float output).
* :func:`plan_conv_tc`: a packed conv as a persistent tensor-core implicit GEMM with the fused epilogue
  ``v = act(acc * scale + bias) + res_coef * res`` written as floats and/or up to two consumers' codes.
* :func:`plan_quant_nhwc`, :func:`plan_channel_stats`: channels-last float -> codes; per-image channel sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantsr_cli.backends.cupy_plan import Launch

ACT_NONE, ACT_RELU, ACT_LEAKY = 0, 1, 2
F_HAS_BIAS, F_HAS_RES, F_OUT_F, F_OUT_Q1, F_Q1_SHIFT, F_OUT_Q2, F_Q2_SHIFT = 1, 2, 4, 8, 16, 32, 64
"""Epilogue flags; must equal the ``QSR_TC_*`` defines in ``kernels/qsr_conv_tc.cu`` (tested)."""
OPS_HAS_SHIFT, OPS_HAS_MUL = 1, 2
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class TcSpec:
    """A ``qsr_conv_tc`` specialisation. ``c``: input channels (multiple of 16); ``ks``: 1 or 3; ``ot``: output
    channels per CTA (multiple of 16, <= 64); ``warps``: 1..8; ``a_signed``: int8 (else uint8) input codes;
    ``yf32``: float32 float output (else binary16); ``wm``: m16 fragments (16-pixel rows) per warp, 1..4."""

    c: int
    ks: int
    ot: int
    warps: int
    a_signed: bool
    yf32: bool = False
    wm: int = 2

    def __post_init__(self) -> None:
        if self.c % 16 or self.c < 16 or self.ks not in (1, 3) or self.ot % 16 or not 16 <= self.ot <= 64:
            raise ValueError(f"no qsr_conv_tc specialisation for {self}")
        if not 1 <= self.warps <= 8 or not 1 <= self.wm <= 4:
            raise ValueError(f"warps={self.warps} (1..8), wm={self.wm} (1..4)")

    @property
    def name(self) -> str:
        return (f"qsr_conv_tc_c{self.c}_k{self.ks}_o{self.ot}_w{self.warps}m{self.wm}_{'s8' if self.a_signed else 'u8'}"
                f"{'_f32' if self.yf32 else ''}")

    @property
    def defines(self) -> tuple[str, ...]:
        return (f"QSR_C={self.c}", f"QSR_KS={self.ks}", f"QSR_OT={self.ot}", f"QSR_WARPS={self.warps}", f"QSR_WM={self.wm}",
                f"QSR_A_SIGNED={int(self.a_signed)}", f"QSR_YF32={int(self.yf32)}", f"QSR_CONV_NAME={self.name}")

    @property
    def k(self) -> int:
        return self.ks * self.ks * self.c

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def tile_pixels(self) -> int:
        """Output pixels per tile: (wm * warps) x 16 for 3x3, 16 * wm * warps for 1x1."""
        return 16 * self.wm * self.warps

    def smem_bytes(self) -> int:
        """Dynamic shared memory (mirrors ``QSR_TC_SMEM``)."""
        krow = self.k if (self.k // 16) % 2 else self.k + 16
        prow = self.c if (self.c // 16) % 2 else self.c + 16
        halo = (self.wm * self.warps + 2) * 18 if self.ks == 3 else self.tile_pixels
        return self.ot * krow + 2 * halo * prow + 16 * self.ot + self.warps * 16 * self.wm * 20 * 4

    def tiles(self, n: int, h: int, w: int) -> int:
        if self.ks == 3:
            th = self.wm * self.warps
            return n * -(-h // th) * -(-w // 16)
        return -(-(n * h * w) // self.tile_pixels)


@dataclass(frozen=True)
class CodeOut:
    """One consumer's codes from the epilogue: ``dst[m * ld + off + (o - c0)]`` for ``c0 <= o < c1`` with
    ``clamp(rint((v + shift[o - c0]) * inv_step), qmin, qmax)``, ``inv_step = float32(1 / step)`` (see
    :func:`inv_step`); ``shift`` float32 ``(c1 - c0,)`` or None."""

    dst: Any
    ld: int
    off: int
    c0: int
    c1: int
    step: float
    qmin: int
    qmax: int
    shift: Any | None = None


@dataclass(frozen=True)
class Epilogue:
    """``v = act(acc * scale[o] + bias[o]) + res_coef * res[m * res_ld + res_off + o]``, then the outputs:
    floats ``yf[m * yf_ld + yf_off + (o - yf_c0)]`` for ``yf_c0 <= o < yf_c1`` and codes ``q1``/``q2``."""

    scale: Any
    bias: Any | None = None
    act: int = ACT_NONE
    slope: float = 0.0
    res: Any | None = None
    res_ld: int = 0
    res_off: int = 0
    res_coef: float = 1.0
    yf: Any | None = None
    yf_ld: int = 0
    yf_off: int = 0
    yf_c0: int = 0
    yf_c1: int = 0
    q1: CodeOut | None = None
    q2: CodeOut | None = None

    def flags(self) -> int:
        f = (F_HAS_BIAS if self.bias is not None else 0) | (F_HAS_RES if self.res is not None else 0)
        f |= F_OUT_F if self.yf is not None else 0
        if self.q1 is not None:
            f |= F_OUT_Q1 | (F_Q1_SHIFT if self.q1.shift is not None else 0)
        if self.q2 is not None:
            f |= F_OUT_Q2 | (F_Q2_SHIFT if self.q2.shift is not None else 0)
        return f

    def check(self, o: int) -> None:
        """ValueError for what the kernel's paired stores cannot do (odd strides/offsets/bounds)."""
        if self.yf is None and self.q1 is None and self.q2 is None:
            raise ValueError("the epilogue writes nothing")
        if self.act not in (ACT_NONE, ACT_RELU, ACT_LEAKY):
            raise ValueError(f"act={self.act}")
        evens = [self.res_ld, self.res_off] if self.res is not None else []
        if self.yf is not None:
            evens += [self.yf_ld, self.yf_off, self.yf_c0, self.yf_c1]
            _check_range(self.yf_c0, self.yf_c1, o, "float output")
        for q in (self.q1, self.q2):
            if q is not None:
                evens += [q.ld, q.off, q.c0, q.c1]
                _check_range(q.c0, q.c1, o, "code output")
                if not (q.step > 0 and -128 <= q.qmin <= 0 <= q.qmax <= 255 and q.qmax - q.qmin <= 255):
                    raise ValueError(f"code output step {q.step}, range [{q.qmin}, {q.qmax}]")
        if any(v % 2 for v in evens):
            raise ValueError(f"epilogue strides/offsets/channel bounds must be even: {evens}")


def _check_range(c0: int, c1: int, o: int, what: str) -> None:
    if not 0 <= c0 < c1 <= o:
        raise ValueError(f"{what} channels [{c0}, {c1}) outside [0, {o})")


def inv_step(step: float) -> float:
    """The epilogue's code multiplier: ``1 / step`` rounded to float32 (the kernel multiplies; the training
    quantizer divides, so a code can differ by one where the quotient is within an ulp of a rounding edge)."""
    return float(np.float32(1.0) / np.float32(step))


def plan_conv_tc(spec: TcSpec, x_codes: Any, wq: Any, epi: Epilogue, *, n: int, h: int, w: int, o: int,
                 max_ctas: int) -> Launch:
    """``qsr_conv_tc``: input codes ``(n, h, w, spec.c)`` dense bytes, weights ``wq`` int8 ``(o, spec.k)``
    (rows OHWI, ``2u - 2zero``), ``epi`` as documented. ``max_ctas``: persistent CTAs per channel slice."""
    epi.check(o)
    if min(n, h, w, o, max_ctas) < 1 or o % 2:
        raise ValueError(f"bad conv size n={n} h={h} w={w} o={o} max_ctas={max_ctas}")
    if n * h * w * max(spec.c, o) > _INT32_MAX // 2:
        raise ValueError("tensor too large for the kernel's indexing; split the batch")
    tiles = spec.tiles(n, h, w)
    grid = (max(1, min(tiles, max_ctas)), -(-o // spec.ot), 1)
    q1, q2 = epi.q1, epi.q2

    def q_args(q: CodeOut | None) -> tuple[tuple[str, Any], ...]:
        if q is None:
            return (("i", 0), ("i", 0), ("i", 0), ("i", 0), ("f", 1.0), ("i", 0), ("i", 0))
        return (("i", q.ld), ("i", q.off), ("i", q.c0), ("i", q.c1), ("f", inv_step(q.step)), ("i", q.qmin),
                ("i", q.qmax))

    args = (("P", x_codes), ("P", wq), ("P", epi.scale), ("P", epi.bias), ("P", epi.res), ("P", epi.yf),
            ("P", None if q1 is None else q1.dst), ("P", None if q1 is None else q1.shift),
            ("P", None if q2 is None else q2.dst), ("P", None if q2 is None else q2.shift),
            ("i", n), ("i", h), ("i", w), ("i", o), ("i", epi.flags()), ("i", epi.act), ("f", float(epi.slope)),
            ("f", float(epi.res_coef)), ("i", epi.res_ld), ("i", epi.res_off), ("i", epi.yf_ld), ("i", epi.yf_off),
            ("i", epi.yf_c0), ("i", epi.yf_c1), *q_args(q1), *q_args(q2))
    return Launch(spec.name, grid, (spec.threads, 1, 1), args, smem=spec.smem_bytes(), defines=spec.defines)


def _dtype_suffix(dtype: str) -> str:
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype {dtype!r}: f16 or f32")
    return dtype


def plan_quant_nhwc(x: Any, codes: Any, *, m: int, hw: int, c: int, x_ld: int, x_off: int, step: float, qmin: int,
                    qmax: int, shift: Any | None = None, mul: Any | None = None, dtype: str = "f16",
                    max_blocks: int = 4096) -> Launch:
    """Codes ``(m, c)`` of the channels-last tensor ``x`` (``dtype`` f16 or f32; pixel stride ``x_ld``, channel
    offset ``x_off``): ``clamp(rint((x * mul[n, c] + shift[c]) / step), qmin, qmax)``, the training quantizer's
    float32 operations; ``mul`` float32 ``(m // hw, c)``. ``c`` a multiple of 8."""
    if c % 8 or min(m, hw, c) < 1 or m % hw or x_off < 0 or x_ld < x_off + c:
        raise ValueError(f"bad quantize geometry m={m} hw={hw} c={c} ld={x_ld} off={x_off}")
    if m * max(c, x_ld) > _INT32_MAX:
        raise ValueError("tensor too large; split the batch")
    blocks = max(1, min(-(-(m * c // 8) // 256), max_blocks))
    flags = (OPS_HAS_SHIFT if shift is not None else 0) | (OPS_HAS_MUL if mul is not None else 0)
    args = (("P", x), ("P", codes), ("P", shift), ("P", mul), ("i", m), ("i", hw), ("i", c), ("i", x_ld),
            ("i", x_off), ("f", float(step)), ("i", qmin), ("i", qmax), ("i", flags))
    return Launch(f"qsr_quant_nhwc_{_dtype_suffix(dtype)}", (blocks, 1, 1), (256, 1, 1), args)


def stats_chunks(hw: int, chunk: int = 2048) -> tuple[int, int]:
    """(chunks, chunk size) of :func:`plan_channel_stats` for ``hw`` pixels per image."""
    return -(-hw // chunk), chunk


def plan_channel_stats(x: Any, part: Any, *, n: int, hw: int, c: int, x_ld: int, x_off: int, dtype: str = "f16",
                       chunk: int = 2048) -> Launch:
    """Per-image channel sums and sums of squares of the channels-last tensor ``x`` (``dtype`` f16 or f32) into
    ``part`` float32 ``(n, chunks, 2, c)`` (reduce over ``chunks`` on the host side, in float64)."""
    if c % 2 or c > 512 or min(n, hw, c) < 1 or x_off < 0 or x_ld < x_off + c:
        raise ValueError(f"bad stats geometry n={n} hw={hw} c={c}")
    chunks, chunk = stats_chunks(hw, chunk)
    args = (("P", x), ("P", part), ("i", hw), ("i", c), ("i", x_ld), ("i", x_off), ("i", chunk))
    return Launch(f"qsr_channel_stats_{_dtype_suffix(dtype)}", (chunks, n, 1), (256, 1, 1), args)

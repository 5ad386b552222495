"""Launch plans for the CUDA kernels in ``kernels/*.cu``: names, grids, argument order, flags.

Pure Python (no cupy, no torch): the cupy backend turns a :class:`Launch` into a RawKernel call, and
the CPU-shim tests run the *same* plan through the kernels compiled with g++ (``tests/kernel_shim``),
so argument order, grid shape, flags and the zero-point fold are tested without a GPU.

Kernels (signatures in ``kernels/qsr_quant_act.cu`` and ``kernels/qsr_packed_gemm.cu``):

* ``qsr_quantize_act``: float tensor (any strides) -> channels-last activation codes, one byte each.
* ``qsr_conv_{mma|dp4a}_w{2|4}_{s8|u8}``: implicit-GEMM conv (kh x kw, stride 1, zero padding) or
  linear (1 x 1 over ``N = rows, H = W = 1``) on packed weight rows, fused epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLAG_HAS_BIAS = 1
FLAG_RELU = 2
FLAG_HAS_RES = 4
FLAG_OUT_FLOAT = 8
FLAG_OUT_CODES = 16
FLAG_HAS_NEXT_SHIFT = 32
FLAG_W_PER_CHANNEL = 64
"""Epilogue flags; must equal the ``QSR_*`` defines in ``kernels/qsr_common.cuh`` (tested)."""

TILE_M = 64
TILE_N = 64
GEMM_THREADS = 128
QUANT_THREADS = 256
QUANT_MAX_BLOCKS = 8192
PATHS = ("mma", "dp4a")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Launch:
    """One kernel launch. ``args`` are ``(kind, value)`` in parameter order: ``("P", buffer or None)``,
    ``("i", int)`` (int32) or ``("f", float)`` (float32); a ``None`` buffer is never read (its flag is
    off) and may be bound to any small placeholder."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[tuple[str, Any], ...]
    smem: int = 0
    """Dynamic shared memory in bytes."""
    defines: tuple[str, ...] = ()
    """Compile-time ``-D`` defines of the kernel's specialisation (``qsr_conv_tc``), empty for the others."""


@dataclass(frozen=True)
class GemmGeometry:
    """Shapes of one packed conv/linear GEMM. Input codes ``(N, H, W, C)``, output ``(N, HO, WO, O)``."""

    n: int
    h: int
    w: int
    c: int
    o: int
    kh: int = 1
    kw: int = 1
    ph: int = 0
    pw: int = 0

    @property
    def ho(self) -> int:
        return self.h + 2 * self.ph - self.kh + 1

    @property
    def wo(self) -> int:
        return self.w + 2 * self.pw - self.kw + 1

    @property
    def m(self) -> int:
        """GEMM rows: output pixels (or linear rows)."""
        return self.n * self.ho * self.wo

    @property
    def k(self) -> int:
        """Codes per packed weight row: ``kh * kw * c``."""
        return self.kh * self.kw * self.c

    def row_bytes(self, w_bits: int) -> int:
        return -(-self.k * w_bits // 8)

    def check(self) -> None:
        """Raise ValueError for shapes the kernels cannot index (empty output, int32 overflow)."""
        if min(self.n, self.h, self.w, self.c, self.o, self.kh, self.kw) < 1 or min(self.ph, self.pw) < 0:
            raise ValueError(f"bad GEMM geometry {self}")
        if self.ho < 1 or self.wo < 1:
            raise ValueError(f"kernel {self.kh}x{self.kw} with padding ({self.ph}, {self.pw}) leaves no output")
        if max(self.n * self.h * self.w * self.c, self.m * self.o, self.m) > _INT32_MAX:
            raise ValueError("tensor too large for 32-bit indexing; split the batch")


def conv_geometry(n: int, h: int, w: int, c: int, o: int, kernel_size: Any, padding: Any,
                  stride: Any = 1, dilation: Any = 1, groups: int = 1) -> GemmGeometry:
    """Geometry of a packed conv; ValueError for what the kernels do not cover (stride, dilation,
    groups, asymmetric 'same' padding)."""
    kh, kw = pair(kernel_size)
    if pair(stride) != (1, 1) or pair(dilation) != (1, 1) or int(groups) != 1:
        raise ValueError(f"stride {stride}, dilation {dilation}, groups {groups}: kernels need 1, 1, 1")
    if isinstance(padding, str):
        if padding == "valid":
            ph = pw = 0
        elif padding == "same" and kh % 2 == 1 and kw % 2 == 1:
            ph, pw = (kh - 1) // 2, (kw - 1) // 2
        else:
            raise ValueError(f"padding={padding!r} with kernel {kh}x{kw} is not supported")
    else:
        ph, pw = pair(padding)
    geom = GemmGeometry(n, h, w, c, o, kh, kw, ph, pw)
    geom.check()
    return geom


def linear_geometry(rows: int, in_features: int, out_features: int) -> GemmGeometry:
    """A linear layer as a 1x1 conv over ``rows`` pixels."""
    geom = GemmGeometry(rows, 1, 1, in_features, out_features)
    geom.check()
    return geom


def pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = (int(x) for x in v)
    return a, b


def zero2_of(w_zero: float, w_bits: int) -> int:
    """``2 * zero`` as an int after checking what the kernels' zero-point fold needs.

    The weight operand is the int8 ``2*u - 2*zero`` (``qsr_fold_zero``): ``zero`` must be an integer or
    half-integer and ``2*u + 128 - 2*zero`` must stay in ``0..255`` for every code ``u``.
    """
    if w_bits not in (2, 4):
        raise ValueError(f"w_bits={w_bits}: the packed kernels take 2- or 4-bit weights")
    z2 = round(2.0 * float(w_zero))
    if abs(2.0 * float(w_zero) - z2) > 1e-6:
        raise ValueError(f"w_zero={w_zero} is not an integer or half-integer")
    umax = (1 << w_bits) - 1
    if not (2 * umax - 127 <= z2 <= 128):
        raise ValueError(f"w_zero={w_zero} is outside the int8 fold range for {w_bits}-bit codes")
    return z2


def act_signed(qmin: int, qmax: int) -> bool:
    """True for signed codes (stored as int8), False for unsigned (uint8); ValueError if a code would
    not fit one byte of that kind."""
    if qmin > 0 or qmax < qmin:
        raise ValueError(f"activation code range [{qmin}, {qmax}] must contain 0")
    if qmin < 0:
        if qmin < -128 or qmax > 127:
            raise ValueError(f"signed activation codes [{qmin}, {qmax}] do not fit int8")
        return True
    if qmax > 255:
        raise ValueError(f"unsigned activation codes [0, {qmax}] do not fit uint8")
    return False


def gemm_kernel_name(path: str, w_bits: int, a_signed: bool) -> str:
    """``qsr_conv_{path}_w{bits}_{s8|u8}``."""
    if path not in PATHS or w_bits not in (2, 4):
        raise ValueError(f"no kernel for path={path!r}, w_bits={w_bits}")
    return f"qsr_conv_{path}_w{w_bits}_{'s8' if a_signed else 'u8'}"


def plan_quantize(x: Any, codes: Any, shift: Any | None, *, n: int, c: int, h: int, w: int,
                  strides: tuple[int, int, int, int], step: float, qmin: int, qmax: int) -> Launch:
    """``codes[n, h, w, c] = clamp(rint((x[n, c, h, w] + shift[c]) / step), qmin, qmax)``.

    ``strides`` are ``x``'s element strides for (n, c, h, w); ``codes`` is a dense ``(N, H, W, C)``
    byte buffer.
    """
    total = n * h * w * c
    if total < 1 or total > _INT32_MAX or max(abs(s) for s in strides) > _INT32_MAX:
        raise ValueError(f"bad quantize size {(n, c, h, w)}")
    blocks = min(-(-total // QUANT_THREADS), QUANT_MAX_BLOCKS)
    args = (("P", x), ("P", codes), ("P", shift), ("i", n), ("i", c), ("i", h), ("i", w),
            *(("i", int(s)) for s in strides), ("f", float(step)), ("i", qmin), ("i", qmax),
            ("i", int(shift is not None)))
    return Launch("qsr_quantize_act", (blocks, 1, 1), (QUANT_THREADS, 1, 1), args)


def plan_gemm(x_codes: Any, qweight: Any, w_scale: Any, *, geom: GemmGeometry, w_bits: int, zero2: int,
              a_signed: bool, a_step: float, per_channel: bool, path: str = "mma", bias: Any | None = None,
              relu: bool = False, residual: Any | None = None, y: Any | None = None,
              y_codes: Any | None = None, next_step: float = 1.0, next_qmin: int = 0, next_qmax: int = 0,
              next_shift: Any | None = None) -> Launch:
    """Packed conv/linear: ``y = [relu](2*acc * 0.5 * w_scale * a_step + bias) + residual``.

    ``x_codes`` ``(N, H, W, C)`` bytes; ``qweight`` ``(O, row_bytes)`` packed rows; outputs ``y``
    (float) and/or ``y_codes`` (next layer's codes, ``clamp(rint((y + next_shift) / next_step))``) are
    dense ``(N, HO, WO, O)``. At least one output must be given.
    """
    geom.check()
    if y is None and y_codes is None:
        raise ValueError("plan_gemm needs y and/or y_codes")
    flags = ((FLAG_HAS_BIAS if bias is not None else 0) | (FLAG_RELU if relu else 0)
             | (FLAG_HAS_RES if residual is not None else 0) | (FLAG_OUT_FLOAT if y is not None else 0)
             | (FLAG_OUT_CODES if y_codes is not None else 0)
             | (FLAG_HAS_NEXT_SHIFT if next_shift is not None else 0)
             | (FLAG_W_PER_CHANNEL if per_channel else 0))
    g = geom
    grid = (-(-g.m // TILE_M), -(-g.o // TILE_N), 1)
    if grid[0] > _INT32_MAX or grid[1] > 65535:
        raise ValueError(f"grid {grid} too large")
    args = (("P", x_codes), ("P", qweight), ("P", w_scale), ("P", bias), ("P", residual), ("P", y),
            ("P", y_codes), ("P", next_shift),
            *(("i", v) for v in (g.n, g.h, g.w, g.c, g.o, g.kh, g.kw, g.ph, g.pw, g.ho, g.wo,
                                 g.row_bytes(w_bits), zero2)),
            ("f", float(a_step)), ("f", float(next_step)), ("i", int(next_qmin)), ("i", int(next_qmax)),
            ("i", flags))
    return Launch(gemm_kernel_name(path, w_bits, a_signed), grid, (GEMM_THREADS, 1, 1), args)

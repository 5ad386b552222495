"""Helpers of ``tests/test_kernels.py``: build and run the CPU shim, the test cases, their reference.

The reference is computed from the documented layout only (DEVELOPERS.md): activation codes
``clamp(round((x + shift) / step), qmin, qmax)`` (torch float32, as the QAT quantizer), weights
``scale * (u - zero)`` with rows in OHWI order packed LSB first, float64 ``conv2d``/``linear``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantsr_cli.backends import cupy_plan as plan

SHIM_DIR = Path(__file__).resolve().parent
KERNELS = SHIM_DIR.parents[1] / "kernels"
BASE_FLAGS = ["-std=c++17", "-O1", "-fno-strict-aliasing", "-ffp-contract=off", f"-I{KERNELS}", f"-I{SHIM_DIR}"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
RUN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}


def shim_exe_path(defines: tuple[str, ...] = ()) -> Path:
    """The shim launcher (``shim_driver.cpp`` + ``kernels/*.cu``), built once per source version and set of
    ``defines`` (``("QSR_C=48", ...)``: the qsr_conv_tc specialisation this binary carries).

    Built with AddressSanitizer + UBSan when the toolchain has them (out-of-bounds kernel accesses then
    fail the test), else plain; cached in the temp dir under a hash of sources, flags and defines."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the CPU kernel shim cannot be built")
    sources = sorted(KERNELS.glob("*.cu*")) + [SHIM_DIR / "cuda_shim.h", SHIM_DIR / "shim_driver.cpp"]
    digest = hashlib.sha256()
    for p in sources:
        digest.update(p.name.encode() + p.read_bytes())
    flags = [f"-D{d}" for d in defines]
    digest.update(" ".join(BASE_FLAGS + SANITIZE + flags).encode())
    out_dir = Path(tempfile.gettempdir()) / "quantsr-kernel-shim"
    out_dir.mkdir(exist_ok=True)
    exe = out_dir / f"qsr_shim-{digest.hexdigest()[:16]}"
    if exe.is_file():
        return exe
    errors = []
    for extra in (SANITIZE, []):  # a toolchain without libasan/libubsan still runs the plain build
        tmp = out_dir / f"{exe.name}.{os.getpid()}.tmp"
        r = subprocess.run([gxx, *BASE_FLAGS, *extra, *flags, str(SHIM_DIR / "shim_driver.cpp"), "-o", str(tmp)],
                           capture_output=True, text=True, timeout=600)
        works = r.returncode == 0 and subprocess.run([str(tmp), "--list"], capture_output=True,
                                                     env=RUN_ENV).returncode == 0
        if works:
            os.replace(tmp, exe)
            return exe
        errors.append(r.stderr[-4000:])
        tmp.unlink(missing_ok=True)
    pytest.fail("cannot build the CPU kernel shim:\n" + "\n----\n".join(errors))


def shim_run(exe: Path, launch: plan.Launch, tmp: Path) -> list[np.ndarray | None]:
    """Run ``launch`` in the shim; returns every pointer argument after the launch (None for unbound)."""
    bufs: list[np.ndarray | None] = []
    blob = bytearray(b"QSRL")
    name = launch.kernel.encode()
    blob += struct.pack("<I", len(name)) + name + struct.pack("<6I", *launch.grid, *launch.block)
    blob += struct.pack("<I", int(getattr(launch, "smem", 0)))
    blob += struct.pack("<I", len(launch.args))
    for kind, value in launch.args:
        if kind == "P":
            arr = np.zeros(1, np.float32) if value is None else np.ascontiguousarray(value)
            bufs.append(None if value is None else arr)
            data = arr.tobytes()
            blob += b"P" + struct.pack("<Q", len(data)) + data
        elif kind == "i":
            blob += b"i" + struct.pack("<i", int(value))
        else:
            blob += b"f" + struct.pack("<f", float(value))
    src, dst = tmp / "launch.bin", tmp / "result.bin"
    src.write_bytes(bytes(blob))
    r = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, env=RUN_ENV, timeout=300)
    assert r.returncode == 0, f"{launch.kernel} failed in the CPU shim (rc {r.returncode}):\n{r.stderr[-6000:]}"
    raw, off, out = dst.read_bytes(), 0, []
    for arr in bufs:
        (n,) = struct.unpack_from("<Q", raw, off)
        off += 8
        out.append(None if arr is None else np.frombuffer(raw[off:off + n], dtype=arr.dtype).reshape(arr.shape))
        off += n
    return out


def pack_rows(rows: np.ndarray, bits: int) -> np.ndarray:
    """DEVELOPERS.md layout: code j of a row in byte j // (8//b) at bit (j % (8//b)) * b, rows padded."""
    per = 8 // bits
    o, k = rows.shape
    nbytes = -(-k // per)
    padded = np.zeros((o, nbytes * per), np.uint32)
    padded[:, :k] = rows
    return (padded.reshape(o, nbytes, per) << (np.arange(per, dtype=np.uint32) * bits)).sum(-1).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    """One layer: conv ``(n, c, h, w) -> o`` with a ``k x k`` kernel, or linear ``(n rows, c) -> o``."""

    name: str
    kind: str
    n: int
    c: int
    h: int
    w: int
    o: int
    k: int
    w_bits: int
    a_bits: int
    signed: bool
    zero: float
    per_channel: bool = True
    bias: bool = True
    shift: bool = True
    relu: bool = False
    residual: bool = False
    out_codes: bool = False
    channels_last: bool = False
    padding: int | None = None  # default k // 2


CASES = (
    Case("c3_o5_3x3_w4a8s", "conv", 2, 3, 7, 9, 5, 3, 4, 8, True, 8.0),
    Case("c13_o64_3x3_w2a2u", "conv", 1, 13, 16, 16, 64, 3, 2, 2, False, 1.5, per_channel=False, bias=False),
    Case("c64_o64_3x3_w4a4u_fused", "conv", 1, 64, 16, 16, 64, 3, 4, 4, False, 7.5, relu=True, residual=True,
         out_codes=True),
    Case("c64_o5_3x3_w2a4s_cl", "conv", 1, 64, 7, 9, 5, 3, 2, 4, True, 2.0, shift=False, channels_last=True),
    Case("c64_o5_1x1_w4a2s", "conv", 2, 64, 7, 9, 5, 1, 4, 2, True, 7.5),
    Case("c13_o64_1x1_w2a8u_codes", "conv", 1, 13, 16, 16, 64, 1, 2, 8, False, 0.0, out_codes=True),
    Case("c48_o70_3x3_valid_w4a4s", "conv", 1, 48, 9, 7, 70, 3, 4, 4, True, 8.0, relu=True, padding=0),
    Case("lin_c60_o64_w4a4s", "linear", 37, 60, 1, 1, 64, 1, 4, 4, True, 7.5),
    Case("lin_c64_o5_w2a8u", "linear", 5, 64, 1, 1, 5, 1, 2, 8, False, 1.5, per_channel=False),
)


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def make_data(case: Case) -> dict[str, Any]:
    """Deterministic inputs, packed weights and the float64 reference output (NHWC) of ``case``."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    conv = case.kind == "conv"
    qmin, qmax = _code_range(case.a_bits, case.signed)
    step = 2.5 / (1 << (case.a_bits - 1)) if case.signed else 3.0 / qmax
    shape = (case.n, case.c, case.h, case.w) if conv else (case.n, case.c)
    x = torch.from_numpy(rng.normal(0.0, 1.0, shape).astype(np.float32))
    shift = torch.from_numpy(rng.normal(0.0, 0.1, case.c).astype(np.float32)) if case.shift else None
    view = (1, -1, 1, 1) if conv else (1, -1)
    xs = x if shift is None else x + shift.view(view)
    codes = torch.clamp(torch.round(xs / step), qmin, qmax)  # the QAT quantizer, float32
    wshape = (case.o, case.c, case.k, case.k) if conv else (case.o, case.c)
    u = rng.integers(0, 1 << case.w_bits, wshape)
    rows = (u.transpose(0, 2, 3, 1) if conv else u).reshape(case.o, -1).astype(np.uint8)
    scale = rng.uniform(0.01, 0.05, case.o if case.per_channel else 1).astype(np.float32)
    bias = rng.normal(0.0, 0.1, case.o).astype(np.float32) if case.bias else None
    scale_view = torch.from_numpy(scale).double().view(-1, *([1] * (len(wshape) - 1)))
    w = scale_view * (torch.from_numpy(u).double() - case.zero)  # dequantized weight
    b = None if bias is None else torch.from_numpy(bias).double()
    x_hat = (step * codes).double()
    if conv:
        pad = case.k // 2 if case.padding is None else case.padding
        geom = plan.conv_geometry(case.n, case.h, case.w, case.c, case.o, case.k, pad)
        ref = F.conv2d(x_hat, w, b, padding=pad).permute(0, 2, 3, 1)
        ref_codes = codes.permute(0, 2, 3, 1)
        x_mem = x.contiguous(memory_format=torch.channels_last) if case.channels_last else x
        strides = tuple(int(s) for s in x_mem.stride())  # the kernel reads x through these strides
        x_buf = x_mem.permute(0, 2, 3, 1).contiguous().numpy() if case.channels_last else x.numpy()
        n, h, w_ = case.n, case.h, case.w
    else:
        geom = plan.linear_geometry(case.n, case.c, case.o)
        ref = F.linear(x_hat, w, b).reshape(case.n, 1, 1, case.o)
        ref_codes = codes.reshape(case.n, 1, 1, case.c)
        x_buf, strides, n, h, w_ = x.numpy(), (case.c, 1, 0, 0), case.n, 1, 1
    if case.relu:
        ref = ref.clamp_min(0.0)
    residual = None
    if case.residual:
        residual = rng.normal(0.0, 1.0, tuple(ref.shape)).astype(np.float32)
        ref = ref + torch.from_numpy(residual).double()
    next_qmin, next_qmax = _code_range(8, True) if case.a_bits == 8 else _code_range(4, False)
    next_shift = rng.normal(0.0, 0.1, case.o).astype(np.float32) if case.out_codes and case.shift else None
    return {
        "x": x, "x_buf": x_buf, "x_strides": strides, "n": n, "h": h, "w": w_, "step": step, "qmin": qmin,
        "qmax": qmax, "shift": None if shift is None else shift.numpy(),
        "ref_codes": ref_codes.numpy().astype(np.int64),
        "geom": geom, "codes_rows": rows, "qweight": pack_rows(rows, case.w_bits), "w_scale": scale, "bias": bias,
        "residual": residual, "ref_y": ref, "next_step": 0.05, "next_qmin": next_qmin, "next_qmax": next_qmax,
        "next_shift": next_shift,
        "next_shift_t": torch.zeros(case.o) if next_shift is None else torch.from_numpy(next_shift),
        "pad": case.k // 2 if case.padding is None else case.padding,
    }


def packed_module(case: Case, d: dict[str, Any]) -> torch.nn.Module:
    """A ``quantsr_cli.packing`` packed layer holding ``case``'s weights (GPU tests)."""
    from quantsr_cli.packing.modules import PackedConv2d, PackedLinear  # noqa: PLC0415

    spec: dict[str, Any] = {
        "w_bits": case.w_bits, "w_zero": case.zero, "per_channel": case.per_channel, "bias": case.bias,
        "a_bits": case.a_bits, "a_qmin": d["qmin"], "a_qmax": d["qmax"], "shift": case.c if case.shift else 0,
    }
    if case.kind == "conv":
        module = PackedConv2d({**spec, "shape": [case.o, case.c, case.k, case.k], "padding": [d["pad"]] * 2})
    else:
        module = PackedLinear({**spec, "shape": [case.o, case.c]})
    with torch.no_grad():
        module.qweight.copy_(torch.from_numpy(d["qweight"]))
        module.w_scale.copy_(torch.from_numpy(d["w_scale"]))
        module.a_step.fill_(d["step"])
        if case.bias:
            module.bias.copy_(torch.from_numpy(d["bias"]))
        if case.shift:
            module.a_shift.copy_(torch.from_numpy(d["shift"]))
    return module

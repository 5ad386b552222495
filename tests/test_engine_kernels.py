"""The engine kernels (``kernels/qsr_conv_tc.cu``, ``kernels/qsr_engine_ops.cu``) on the CPU shim.

Each specialisation of ``qsr_conv_tc`` is compiled into its own shim binary and run through the launch plans
of :mod:`quantsr_cli.backends.engine_plan` against a reference built from the documented semantics: integer
conv of the codes with the int8 weights (float64, exact), then the epilogue in float32 with the kernel's own
operation order (the shim compiles without FMA contraction; codes multiply by ``inv_step``), so float outputs
and codes are compared bit for bit. Edge tiles, persistent CTAs looping over several tiles (double buffering), channel slices, the 16-channel
K remainder, signed/unsigned codes, LeakyReLU/ReLU, binary16 residuals and two code consumers are covered.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantsr_cli.backends import engine_plan as ep

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel_shim"))
from kernel_harness import shim_exe_path, shim_run  # noqa: E402

CONV_CASES = [
    # (spec, n, h, w, o, epilogue kind)
    (ep.TcSpec(64, 3, 64, 4, False), 2, 11, 21, 64, "full"),
    (ep.TcSpec(48, 3, 64, 2, True), 1, 9, 17, 64, "imdn_split"),
    (ep.TcSpec(48, 3, 16, 4, False), 2, 7, 5, 16, "plain"),
    (ep.TcSpec(64, 1, 64, 4, True), 2, 5, 13, 64, "full"),
    (ep.TcSpec(96, 1, 32, 2, False), 1, 6, 11, 64, "two_codes"),
    (ep.TcSpec(32, 3, 16, 1, True, yf32=True), 1, 5, 35, 32, "plain"),
    (ep.TcSpec(64, 3, 64, 2, False, wm=4), 2, 11, 21, 64, "full"),
    (ep.TcSpec(48, 3, 64, 1, True, wm=3), 1, 9, 17, 64, "imdn_split"),
    (ep.TcSpec(64, 1, 32, 2, True, wm=4), 1, 7, 19, 64, "two_codes"),
    (ep.TcSpec(64, 3, 64, 2, True, yf32=True, wm=3), 1, 13, 18, 64, "full"),
]


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def make_conv_case(spec: ep.TcSpec, n: int, h: int, w: int, o: int, kind: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + spec.c * 7 + o)
    lo, hi = (-8, 7) if spec.a_signed else (0, 15)
    codes = rng.integers(lo, hi + 1, (n, h, w, spec.c)).astype(np.int8 if spec.a_signed else np.uint8)
    wq = rng.integers(-15, 16, (o, spec.k)).astype(np.int8)  # 2u - 2zero for 4-bit codes, zero 7.5
    scale = _f32(rng.uniform(0.002, 0.01, o))
    bias = _f32(rng.normal(0, 0.2, o))
    d = {"codes": codes, "wq": wq, "scale": scale, "bias": None, "n": n, "h": h, "w": w, "o": o}
    res = None
    if kind in ("full", "imdn_split", "two_codes"):
        d["bias"] = bias
    if kind == "full":
        ftype = np.float32 if spec.yf32 else np.float16
        res = rng.normal(0, 1, (n * h * w, o + 6)).astype(ftype)  # ld o + 6, offset 2
        yf = np.zeros((n * h * w, 40), ftype)
        q1 = np.zeros((n * h * w, 48), np.uint8)
        sh1 = _f32(rng.normal(0, 0.05, 48))
        epi = ep.Epilogue(scale, bias, act=ep.ACT_LEAKY, slope=0.05, res=res, res_ld=o + 6, res_off=2, res_coef=0.75,
                          yf=yf, yf_ld=40, yf_off=8, yf_c0=16, yf_c1=48,
                          q1=ep.CodeOut(q1, 48, 0, 16, 64, 0.1, -8, 7, sh1))
    elif kind == "imdn_split":
        yf = np.zeros((n * h * w, 64), np.float16)  # IMDN: distilled channels 0..15 into a concat buffer
        q1 = np.zeros((n * h * w, 48), np.uint8)    # remaining 16..63 as the next conv's codes
        epi = ep.Epilogue(scale, bias, act=ep.ACT_LEAKY, slope=0.05, yf=yf, yf_ld=64, yf_off=32, yf_c0=0, yf_c1=16,
                          q1=ep.CodeOut(q1, 48, 0, 16, 64, 0.07, 0, 15, _f32(rng.normal(0, 0.05, 48))))
    elif kind == "two_codes":
        q1 = np.zeros((n * h * w, o), np.int8)
        q2 = np.zeros((n * h * w, 3 * o), np.uint8)
        epi = ep.Epilogue(scale, bias, act=ep.ACT_RELU, q1=ep.CodeOut(q1, o, 0, 0, o, 0.05, -128, 127),
                          q2=ep.CodeOut(q2, 3 * o, o, 0, o, 0.2, 0, 3, _f32(rng.normal(0, 0.1, o))))
    else:
        yf = np.zeros((n * h * w, o), np.float32 if spec.yf32 else np.float16)
        epi = ep.Epilogue(scale, yf=yf, yf_ld=o, yf_c0=0, yf_c1=o)
    d["epi"] = epi
    return d


def reference(spec: ep.TcSpec, d: dict) -> dict:
    """Outputs of the documented epilogue, float32 in the kernel's operation order."""
    n, h, w, o = d["n"], d["h"], d["w"], d["o"]
    x = torch.from_numpy(d["codes"].astype(np.float64)).permute(0, 3, 1, 2)
    wt = torch.from_numpy(d["wq"].astype(np.float64)).view(o, spec.ks, spec.ks, spec.c).permute(0, 3, 1, 2)
    acc = F.conv2d(x, wt, padding=spec.ks // 2).permute(0, 2, 3, 1).reshape(n * h * w, o).numpy()
    assert np.abs(acc).max() < 2**24
    epi = d["epi"]
    v = _f32(acc) * epi.scale[None, :]
    v = v + (epi.bias[None, :] if epi.bias is not None else np.float32(0))
    if epi.act == ep.ACT_RELU:
        v = np.maximum(v, np.float32(0))
    elif epi.act == ep.ACT_LEAKY:
        v = np.where(v >= 0, v, v * np.float32(epi.slope)).astype(np.float32)
    if epi.res is not None:
        r = epi.res[:, epi.res_off:epi.res_off + o].astype(np.float32)
        v = v + np.float32(epi.res_coef) * r
    out = {}
    if epi.yf is not None:
        out["yf"] = v[:, epi.yf_c0:epi.yf_c1].astype(epi.yf.dtype)
    for key in ("q1", "q2"):
        q = getattr(epi, key)
        if q is not None:
            sh = q.shift if q.shift is not None else np.zeros(q.c1 - q.c0, np.float32)
            vv = v[:, q.c0:q.c1]
            codes = np.clip(np.rint((vv + sh[None, :]) * np.float32(ep.inv_step(q.step))), q.qmin, q.qmax)
            out[key] = codes.astype(np.int64)
    return out


def run_conv(spec: ep.TcSpec, d: dict, tmp: Path, max_ctas: int = 3) -> dict:
    exe = shim_exe_path(spec.defines)
    lp = ep.plan_conv_tc(spec, d["codes"], d["wq"], d["epi"], n=d["n"], h=d["h"], w=d["w"], o=d["o"],
                         max_ctas=max_ctas)
    outs = shim_run(exe, lp, tmp)
    epi, res = d["epi"], {}
    if epi.yf is not None:
        res["yf"] = outs[5][:, epi.yf_off:epi.yf_off + epi.yf_c1 - epi.yf_c0]
    for key, idx in (("q1", 6), ("q2", 8)):
        q = getattr(epi, key)
        if q is not None:
            raw = outs[idx][:, q.off:q.off + q.c1 - q.c0]
            res[key] = raw.view(np.int8 if q.qmin < 0 else np.uint8).astype(np.int64)
    res["all"] = outs
    return res


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0].name}_{c[5]}")
def test_conv_tc_matches_reference_bit_for_bit(case: tuple, tmp_path: Path) -> None:
    spec, n, h, w, o, kind = case
    d = make_conv_case(spec, n, h, w, o, kind)
    got = run_conv(spec, d, tmp_path)
    want = reference(spec, d)
    assert set(want) <= set(got)
    for key, ref in want.items():
        np.testing.assert_array_equal(got[key], ref, err_msg=f"{spec.name} {kind}: {key}")
    epi = d["epi"]
    if kind == "full":  # untouched columns of the strided outputs stay untouched
        assert not got["all"][5][:, :epi.yf_off].any() and not got["all"][5][:, epi.yf_off + 32:].any()


def test_conv_tc_grid_sizes_agree(tmp_path: Path) -> None:
    """One CTA looping over every tile (deep double-buffer reuse) == one CTA per tile."""
    spec = ep.TcSpec(64, 3, 64, 2, False)
    d = make_conv_case(spec, 1, 13, 37, 64, "plain", seed=3)
    one = run_conv(spec, d, tmp_path, max_ctas=1)["yf"]
    d2 = make_conv_case(spec, 1, 13, 37, 64, "plain", seed=3)
    many = run_conv(spec, d2, tmp_path, max_ctas=10_000)["yf"]
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(one, reference(spec, d)["yf"])


def test_specs_and_plans_validate() -> None:
    assert ep.TcSpec(64, 3, 64, 4, False).smem_bytes() == 64 * 592 + 2 * 180 * 80 + 1024 + 4 * 32 * 80
    assert ep.TcSpec(48, 3, 16, 4, True).smem_bytes() == 16 * 432 + 2 * 180 * 48 + 256 + 4 * 32 * 80
    for bad in ((40, 3, 64, 4), (64, 5, 64, 4), (64, 3, 24, 4), (64, 3, 128, 4), (64, 3, 64, 9)):
        with pytest.raises(ValueError):
            ep.TcSpec(*bad, False)
    spec = ep.TcSpec(64, 3, 64, 4, False)
    scale = np.ones(64, np.float32)
    with pytest.raises(ValueError, match="writes nothing"):
        ep.plan_conv_tc(spec, None, None, ep.Epilogue(scale), n=1, h=8, w=8, o=64, max_ctas=4)
    with pytest.raises(ValueError, match="even"):
        ep.plan_conv_tc(spec, None, None, ep.Epilogue(scale, yf=1, yf_ld=65, yf_c1=64), n=1, h=8, w=8, o=64,
                        max_ctas=4)
    with pytest.raises(ValueError, match="outside"):
        ep.plan_conv_tc(spec, None, None, ep.Epilogue(scale, yf=1, yf_ld=64, yf_c1=80), n=1, h=8, w=8, o=64,
                        max_ctas=4)
    lp = ep.plan_conv_tc(spec, None, None, ep.Epilogue(scale, yf=1, yf_ld=64, yf_c1=64), n=2, h=17, w=33, o=64,
                         max_ctas=1000)
    assert lp.grid == (2 * 3 * 3, 1, 1) and lp.smem == spec.smem_bytes() and "QSR_OT=64" in lp.defines


def test_flags_match_kernel_source() -> None:
    import re

    text = (REPO / "kernels" / "qsr_conv_tc.cu").read_text()
    defines = dict(re.findall(r"#define QSR_TC_(\w+) (\d+)\n", text))
    for name in ("HAS_BIAS", "HAS_RES", "OUT_F", "OUT_Q1", "Q1_SHIFT", "OUT_Q2", "Q2_SHIFT"):
        assert int(defines[name]) == getattr(ep, f"F_{name}"), name
    ops = dict(re.findall(r"#define QSR_OPS_(\w+) (\d+)\n", (REPO / "kernels" / "qsr_engine_ops.cu").read_text()))
    assert int(ops["HAS_SHIFT"]) == ep.OPS_HAS_SHIFT and int(ops["HAS_MUL"]) == ep.OPS_HAS_MUL


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_quant_nhwc_and_channel_stats(tmp_path: Path, dtype: str) -> None:
    exe = shim_exe_path()
    rng = np.random.default_rng(5)
    n, hw, c, ld, off = 2, 37, 24, 40, 8
    x = rng.normal(0, 2, (n * hw, ld)).astype(np.float16 if dtype == "f16" else np.float32)
    x[3, off] = np.float16(0.25)  # exact tie after scaling by step 0.5: round half to even
    mul = _f32(rng.uniform(0.5, 1.5, (n, c)))
    shift = _f32(rng.normal(0, 0.1, c))
    codes = np.zeros((n * hw, c), np.uint8)
    lp = ep.plan_quant_nhwc(x, codes, m=n * hw, hw=hw, c=c, x_ld=ld, x_off=off, step=0.5, qmin=-8, qmax=7,
                            shift=shift, mul=mul, dtype=dtype)
    got = shim_run(exe, lp, tmp_path)[1].view(np.int8).astype(np.int64)
    xs = x[:, off:off + c].astype(np.float32) * np.repeat(mul, hw, axis=0)
    want = np.clip(np.rint((xs + shift[None, :]) / np.float32(0.5)), -8, 7).astype(np.int64)
    np.testing.assert_array_equal(got, want)
    chunks, _ = ep.stats_chunks(hw, 16)
    part = np.zeros((n, chunks, 2, c), np.float32)
    lp = ep.plan_channel_stats(x, part, n=n, hw=hw, c=c, x_ld=ld, x_off=off, dtype=dtype, chunk=16)
    first = shim_run(exe, lp, tmp_path)[1].copy()
    out = first.astype(np.float64).sum(axis=1)
    xv = x[:, off:off + c].astype(np.float64).reshape(n, hw, c)
    np.testing.assert_allclose(out[:, 0], xv.sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[:, 1], (xv ** 2).sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(shim_run(exe, lp, tmp_path)[1], first)  # deterministic partials


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_engine_kernels_compile_without_spills(arch: str, tmp_path: Path) -> None:
    """nvcc + ptxas for the tuner's tile shapes: no spills, no stack frame (accumulators stay in registers),
    and the hot loop uses ldmatrix, cp.async and the int8 mma (read in the PTX)."""
    import re
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: CUDA compile check skipped")
    kernels = REPO / "kernels"
    specs = [ep.TcSpec(64, 3, 64, 4, False, wm=4), ep.TcSpec(64, 3, 64, 8, True, wm=2),
             ep.TcSpec(48, 3, 16, 4, False, wm=4), ep.TcSpec(384, 1, 64, 2, False, wm=2),
             ep.TcSpec(64, 1, 64, 4, True, yf32=True, wm=4)]
    for spec in specs:
        cmd = [nvcc, f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", f"-I{kernels}",
               *(f"-D{d}" for d in spec.defines), "-o", str(tmp_path / "k.cubin"), str(kernels / "qsr_conv_tc.cu")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", r.stderr), (spec, r.stderr)
    ptx = tmp_path / "k.ptx"
    r = subprocess.run([nvcc, f"-arch={arch}", "-std=c++17", "-ptx", f"-I{kernels}", "-o", str(ptx),
                        str(kernels / "qsr_conv_tc.cu")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = ptx.read_text()
    for needle in ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "cp.async.cg.shared.global",
                   "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32", "cvt.rn.f16.f32"):
        assert needle in text, needle
    r = subprocess.run([nvcc, f"-arch={arch}", "-std=c++17", "-cubin", "-Xptxas", "-v", f"-I{kernels}", "-o",
                        str(tmp_path / "o.cubin"), str(kernels / "qsr_engine_ops.cu")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "spill stores" in r.stderr and " 0 bytes spill stores" in r.stderr, r.stderr

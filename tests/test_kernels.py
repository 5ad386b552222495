"""Packed 2/4-bit CUDA kernels (``kernels/*.cu``), tested without a GPU.

(a) compile checks: ``nvcc -arch=sm_90 -ptx`` per file, NVRTC-compatibility rules, ptxas spills;
(b) the same sources run on the CPU through ``tests/kernel_shim`` (g++, fibers for threads/warps,
    AddressSanitizer + UBSan) with the launch plans of the cupy backend, against a torch float64
    reference built from the documented layout (dequantized weights, fake-quantized activations);
(c) a corrupted packing order is detected. GPU tests (marker ``gpu``) need CUDA + cupy.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quantsr_cli.backends import cupy_backend as cb
from quantsr_cli.backends import cupy_plan as plan
from quantsr_cli.errors import BackendUnavailableError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel_shim"))
from kernel_harness import CASES, Case, make_data, pack_rows, shim_exe_path, shim_run  # noqa: E402

KERNELS = REPO / "kernels"
CU_FILES = sorted(KERNELS.glob("*.cu"))


# ---------------------------------------------------------------------------------------------- (a)


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_ptx_sm90(cu: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: CUDA compile check skipped (install the CUDA toolkit to run it)")
    out = tmp_path / "k.ptx"
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ptx", f"-I{KERNELS}", "-o", str(out), str(cu)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"nvcc failed on {cu.name}:\n{r.stderr}"
    ptx = out.read_text()
    if cu.name == "qsr_packed_gemm.cu":
        assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in ptx
        assert "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32" in ptx
        assert "dp4a.s32.s32" in ptx and "dp4a.u32.s32" in ptx
        assert ".local" not in ptx, "accumulators spilled to local memory (missing unroll?)"


def test_sources_are_nvrtc_compatible() -> None:
    """NVRTC has no host headers: only local quoted includes, no std::, every kernel the plans name
    is an ``extern "C" __global__`` entry (kernels.md section 4)."""
    names = set()
    for src in sorted(KERNELS.glob("*.cu*")):
        text = src.read_text()
        assert not re.search(r"^\s*#\s*include\s*<", text, re.M), f"{src.name}: system include"
        for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M):
            assert (KERNELS / inc).is_file(), f"{src.name}: include {inc} not in kernels/"
        assert "std::" not in text, f"{src.name}: uses the C++ standard library"
        names |= set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(', text))
        names |= set(re.findall(r"QSR_GEMM_ENTRY\((\w+),", text))
    wanted = {"qsr_quantize_act"} | {plan.gemm_kernel_name(p, b, s) for p in plan.PATHS for b in (2, 4)
                                     for s in (True, False)}
    assert wanted <= names
    expanded = cb.kernel_source("qsr_packed_gemm.cu")
    assert "#include" not in expanded and "qsr_unpack_u4x8" in expanded


def test_nvrtc_compiles_expanded_sources() -> None:
    pytest.importorskip("cupy", reason="cupy not installed: NVRTC check skipped (nvcc check still runs)")
    try:
        from cupy.cuda import nvrtc  # noqa: PLC0415

        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"libnvrtc not loadable: {exc}")
    # What cupy.RawModule does at first use (its default options + the backend's), header-free source.
    for name, kernel in (("qsr_quant_act.cu", "qsr_quantize_act"), ("qsr_packed_gemm.cu", "qsr_conv_mma_w4_u8")):
        prog = nvrtc.createProgram(cb.kernel_source(name), name, [], [])
        try:
            nvrtc.compileProgram(prog, ["-arch=sm_90", "--device-as-default-execution-space", "-ftz=true",
                                        *cb.compile_options(name, kernel)])
            ptx = nvrtc.getPTX(prog)
            entries = re.findall(r"\.entry (\w+)", ptx.decode() if isinstance(ptx, bytes) else ptx)
            assert entries == [kernel], entries
        except nvrtc.NVRTCError as exc:
            raise AssertionError(nvrtc.getProgramLog(prog)) from exc
        finally:
            nvrtc.destroyProgram(prog)


def test_ptxas_reports_no_spills(tmp_path: Path) -> None:
    """One tensor-core and one dp4a entry (the other six differ only in template constants)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    pick = ["-DQSR_SELECT", "-DQSR_WANT_qsr_conv_mma_w4_u8", "-DQSR_WANT_qsr_conv_dp4a_w2_s8"]
    r = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-cubin", "-Xptxas", "-v", *pick, f"-I{KERNELS}",
                        "-o", str(tmp_path / "k.cubin"), str(KERNELS / "qsr_packed_gemm.cu")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
    assert len(spills) == 2 and all(s == "0" for s in spills), r.stderr


def test_flags_match_header() -> None:
    defines = dict(re.findall(r"#define QSR_(\w+) (\d+)", (KERNELS / "qsr_common.cuh").read_text()))
    for name in ("HAS_BIAS", "RELU", "HAS_RES", "OUT_FLOAT", "OUT_CODES", "HAS_NEXT_SHIFT", "W_PER_CHANNEL"):
        assert int(defines[name]) == getattr(plan, f"FLAG_{name}"), name


# ---------------------------------------------------------------------------------------------- (b)


@pytest.fixture(scope="module")
def shim() -> Path:
    return shim_exe_path()


def test_shim_signatures_match_plans(shim: Path) -> None:
    listed = dict(line.split() for line in subprocess.run([str(shim), "--list"], capture_output=True,
                                                          text=True, check=True).stdout.splitlines())
    geom = plan.conv_geometry(1, 4, 4, 8, 8, 3, 1)
    q = plan.plan_quantize(None, None, None, n=1, c=8, h=4, w=4, strides=(128, 16, 4, 1), step=1.0,
                           qmin=0, qmax=15)
    assert listed[q.kernel] == "".join(k for k, _ in q.args)
    for path in plan.PATHS:
        for bits in (2, 4):
            for signed in (True, False):
                g = plan.plan_gemm(None, None, None, geom=geom, w_bits=bits, zero2=2, a_signed=signed,
                                   a_step=1.0, per_channel=False, path=path, y=np.zeros(1))
                assert listed[g.kernel] == "".join(k for k, _ in g.args), g.kernel


def _run_case(shim: Path, tmp: Path, case: Case, path: str, qweight: np.ndarray | None = None) -> dict:
    d = make_data(case)
    codes = np.zeros((d["n"], d["h"], d["w"], case.c), np.int8 if case.signed else np.uint8)
    q = plan.plan_quantize(d["x_buf"], codes, d["shift"], n=d["n"], c=case.c, h=d["h"], w=d["w"],
                           strides=d["x_strides"], step=d["step"], qmin=d["qmin"], qmax=d["qmax"])
    codes = shim_run(shim, q, tmp)[1]
    np.testing.assert_array_equal(codes.astype(np.int64), d["ref_codes"])  # bit-exact quantizer
    geom = d["geom"]
    y = np.zeros((geom.n, geom.ho, geom.wo, geom.o), np.float32)
    y_codes = np.zeros_like(y, dtype=np.uint8) if case.out_codes else None
    g = plan.plan_gemm(codes, d["qweight"] if qweight is None else qweight, d["w_scale"], geom=geom,
                       w_bits=case.w_bits, zero2=plan.zero2_of(case.zero, case.w_bits), a_signed=case.signed,
                       a_step=d["step"], per_channel=case.per_channel, path=path, bias=d["bias"],
                       relu=case.relu, residual=d["residual"], y=y, y_codes=y_codes, next_step=d["next_step"],
                       next_qmin=d["next_qmin"], next_qmax=d["next_qmax"], next_shift=d["next_shift"])
    out = shim_run(shim, g, tmp)
    d["y"] = torch.from_numpy(out[5].copy()).double()
    d["y_codes"] = out[6]
    return d


@pytest.mark.parametrize("path", plan.PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_shim_matches_torch_reference(shim: Path, tmp_path: Path, case: Case, path: str) -> None:
    d = _run_case(shim, tmp_path, case, path)
    ref = d["ref_y"]
    err = float((d["y"] - ref).abs().max())
    assert err <= 1e-3, f"max |kernel - reference| = {err:g}"
    assert err <= 2e-6 * max(1.0, float(ref.abs().max())), f"float32 epilogue error {err:g} too large"
    if case.out_codes:  # fused next-layer quantizer == torch's quantizer applied to the kernel's own y
        y32 = d["y"].float()
        want = torch.clamp(torch.round((y32 + d["next_shift_t"]) / d["next_step"]), d["next_qmin"], d["next_qmax"])
        got = d["y_codes"].view(np.int8 if d["next_qmin"] < 0 else np.uint8).astype(np.int64)
        np.testing.assert_array_equal(got, want.numpy().astype(np.int64))


def test_quantize_ties_round_half_even(shim: Path, tmp_path: Path) -> None:
    """Exact .5 ties (step 0.25), channels-last input strides, per-channel shift, clamping."""
    n, c, h, w = 2, 5, 3, 4
    k = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w) % 23 - 11
    x = (k * 0.25 + 0.125).contiguous(memory_format=torch.channels_last)
    shift = torch.tensor([0.0, 0.25, -0.5, 1.0, 0.0])
    ref = torch.clamp(torch.round((x + shift.view(1, -1, 1, 1)) / 0.25), -8, 7).permute(0, 2, 3, 1)
    store = x.permute(0, 2, 3, 1).contiguous().numpy()  # the memory of the channels-last tensor
    codes = np.zeros((n, h, w, c), np.int8)
    q = plan.plan_quantize(store, codes, shift.numpy(), n=n, c=c, h=h, w=w, strides=tuple(x.stride()),
                           step=0.25, qmin=-8, qmax=7)
    np.testing.assert_array_equal(shim_run(shim, q, tmp_path)[1].astype(np.int64), ref.numpy().astype(np.int64))


# ---------------------------------------------------------------------------------------------- (c)


def test_flipped_nibble_order_is_detected(shim: Path, tmp_path: Path) -> None:
    """Swapping the two nibbles of every packed W4 byte (the 'MSB first' mistake) must break the result."""
    case = next(c for c in CASES if c.name == "c64_o64_3x3_w4a4u_fused")
    d = make_data(case)
    swapped = ((d["qweight"] >> 4) | (d["qweight"] << 4)).astype(np.uint8)
    bad = _run_case(shim, tmp_path, case, "mma", qweight=swapped)
    assert float((bad["y"] - bad["ref_y"]).abs().max()) > 0.05
    rows = d["codes_rows"]
    assert np.array_equal(pack_rows(rows, 4), d["qweight"])  # the reference packing itself is LSB first
    assert pack_rows(rows, 4)[0, 0] == (rows[0, 0] | (rows[0, 1] << 4))


# ---------------------------------------------------------------------------------------------- backend


def _shim_launcher(shim: Path, tmp: Path):  # noqa: ANN202 - a cupy_backend.launch stand-in
    """Run the backend's launches (CPU torch tensors as buffers) in the shim, copying outputs back."""

    def run(lp: plan.Launch, device: torch.device) -> None:
        args, tensors = [], []
        for kind, value in lp.args:
            if kind == "P" and value is not None:
                span = 1 + sum((n - 1) * st for n, st in zip(value.shape, value.stride()))
                mem = value if value.is_contiguous() else value.as_strided((span,), (1,))
                args.append(("P", mem.numpy()))
                tensors.append(value)
            else:
                args.append((kind, value))
                if kind == "P":
                    tensors.append(None)
        outs = shim_run(shim, plan.Launch(lp.kernel, lp.grid, lp.block, tuple(args)), tmp)
        for t, out in zip(tensors, outs):
            if t is not None and t.is_contiguous():
                t.copy_(torch.from_numpy(out.copy()).view(t.shape))

    return run


def _tiny_packed_model() -> tuple[list[torch.nn.Module], Any]:
    """conv3x3 (W4A4u) -> ReLU -> conv1x1 (W2A2s, channels-last input) -> linear (W4A8s) on packing's modules."""
    from kernel_harness import packed_module  # noqa: PLC0415 - needs quantsr_cli.packing

    specs = (Case("m1", "conv", 1, 3, 9, 7, 16, 3, 4, 4, False, 7.5),
             Case("m2", "conv", 1, 16, 9, 7, 16, 1, 2, 2, True, 1.5),
             Case("m3", "linear", 63, 16, 1, 1, 8, 1, 4, 8, True, 8.0, per_channel=False))
    layers = [packed_module(c, make_data(c)) for c in specs]

    def model(x: torch.Tensor) -> torch.Tensor:
        h = layers[1](torch.relu(layers[0](x)))
        return layers[2](h.permute(0, 2, 3, 1))

    return layers, model


@pytest.mark.parametrize("path", plan.PATHS)
def test_backend_forward_runs_a_packed_model(shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             path: str) -> None:
    """cupy_backend.forward (layout, strides, dtypes, NCHW view of the NHWC output) with its launches run
    in the shim, on packing's modules, against their torch reference."""
    monkeypatch.setattr(cb, "launch", _shim_launcher(shim, tmp_path))
    monkeypatch.setattr(cb, "kernel_path", lambda device: path)
    layers, model = _tiny_packed_model()
    x = torch.rand(2, 3, 9, 7) * 2 - 0.5
    ref = model(x)
    for layer in layers:
        assert cb.prepare(layer) is cb.impl and layer.backend_note == "cupy kernels"
        layer.impl = cb.forward  # impl() itself insists on CUDA tensors
    got = model(x)
    assert got.shape == ref.shape == (2, 9, 7, 8)
    assert float((got - ref).abs().max()) <= 1e-3


def test_check_available_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    both = r"no CUDA device.*cupy is not installed \(pip install quantsr\[gpu\]\)"
    with pytest.raises(BackendUnavailableError, match=both):
        cb.check_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BackendUnavailableError) as info:
        cb.check_available()
    assert "cupy is not installed (pip install quantsr[gpu])" in str(info.value) and "CUDA" not in str(info.value)
    fake = types.ModuleType("cupy")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError) as info:
        cb.check_available()
    assert "no CUDA device" in str(info.value) and "cupy" not in str(info.value).split(":", 1)[1]


def test_layer_validation_and_fallback_reasons() -> None:
    def layer(**kw: object) -> types.SimpleNamespace:
        base = dict(qweight=torch.zeros(4, 18, dtype=torch.uint8), w_scale=torch.ones(4), bias=None,
                    a_step=torch.ones(1), a_shift=None, w_bits=4, w_zero=7.5, a_bits=4, a_qmin=0, a_qmax=15,
                    in_channels=4, out_channels=4, kernel_size=(3, 3), padding=(1, 1), stride=(1, 1))
        return types.SimpleNamespace(**{**base, **kw})

    assert cb.supported_reason(layer()) is None
    assert "w_bits=8" in cb.supported_reason(layer(w_bits=8))
    assert "stride" in cb.supported_reason(layer(stride=(2, 2)))
    assert "a_bits=32" in cb.supported_reason(layer(a_bits=32))
    assert "half-integer" in cb.supported_reason(layer(w_zero=7.25))
    assert cb.prepare(layer()) is cb.impl
    assert plan.zero2_of(7.5, 4) == 15 and plan.zero2_of(0, 2) == 0
    with pytest.raises(ValueError):
        plan.zero2_of(70, 4)
    assert plan.act_signed(-8, 7) and not plan.act_signed(0, 255)
    with pytest.raises(ValueError):
        plan.act_signed(-128, 200)


def test_pyproject_ships_kernels_and_lists_every_package() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["quantsr_cli.kernels"] == "kernels"
    assert {"*.cu", "*.cuh"} <= set(cfg["package-data"]["quantsr_cli.kernels"])
    listed = set(cfg["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "quantsr_cli").rglob("__init__.py")}
    assert on_disk <= listed, f"packages missing from pyproject [tool.setuptools] packages: {on_disk - listed}"
    assert "quantsr_cli.kernels" in listed


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_ready() -> None:
    try:
        cb.check_available()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _no_tf32(request: pytest.FixtureRequest) -> Any:
    """GPU tests compare against torch's fp32 reference: with cuDNN's TF32 default (sm_80+) that reference
    itself is off by 3-9e-3 on K >= 432 convs, so TF32 is off while a ``gpu`` test runs."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@pytest.mark.gpu
@pytest.mark.parametrize("path", plan.PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_packed_layers_match_reference(case: Case, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_ready()
    from kernel_harness import packed_module  # noqa: PLC0415 - needs quantsr_cli.packing

    monkeypatch.setenv("QUANTSR_CUPY_KERNEL", path)
    d = make_data(case)
    module = packed_module(case, d).cuda()
    x = d["x"].cuda()
    ref = module.reference(x if case.kind == "conv" else x.reshape(-1, case.c))
    module.impl = cb.prepare(module)
    got = module(x if case.kind == "conv" else x.reshape(-1, case.c))
    assert torch.allclose(got, ref, atol=1e-3, rtol=0), float((got - ref).abs().max())
    if not (case.relu or case.residual):  # d["ref_y"] includes the fused epilogue, a plain layer does not
        exact = (got.permute(0, 2, 3, 1) if case.kind == "conv" else got.reshape(d["ref_y"].shape)).double().cpu()
        err = float((exact - d["ref_y"]).abs().max())
        assert err <= 2e-6 * max(1.0, float(d["ref_y"].abs().max())) + 1e-6, f"vs float64 reference: {err:g}"


@pytest.mark.gpu
@pytest.mark.parametrize("path", plan.PATHS)
def test_gpu_packed_model_and_fused_epilogue(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_ready()
    monkeypatch.setenv("QUANTSR_CUPY_KERNEL", path)
    layers, model = _tiny_packed_model()
    for layer in layers:
        layer.cuda()
    x = torch.rand(2, 3, 9, 7, device="cuda") * 2 - 0.5
    ref = model(x)
    for layer in layers:
        layer.impl = cb.prepare(layer)
    assert float((model(x) - ref).abs().max()) <= 1e-3
    # fused ReLU + residual + next-layer codes through run_packed
    from kernel_harness import packed_module  # noqa: PLC0415

    case = next(c for c in CASES if c.out_codes and c.residual)
    d = make_data(case)
    module = packed_module(case, d).cuda()
    codes = cb.quantize_codes(d["x"].cuda(), d["x_strides"], (d["n"], case.c, d["h"], d["w"]), d["step"],
                              d["qmin"], d["qmax"], torch.from_numpy(d["shift"]).cuda())
    shift = None if d["next_shift"] is None else torch.from_numpy(d["next_shift"]).cuda()
    y, nxt = cb.run_packed(module, codes, d["geom"], relu=True, residual=torch.from_numpy(d["residual"]).cuda(),
                           next_act=(d["next_step"], d["next_qmin"], d["next_qmax"], shift))
    assert float((y.cpu().double() - d["ref_y"]).abs().max()) <= 1e-3
    want = torch.clamp(torch.round((y.cpu() + d["next_shift_t"]) / d["next_step"]), d["next_qmin"], d["next_qmax"])
    assert torch.equal(nxt.cpu().to(torch.int64), want.to(torch.int64))

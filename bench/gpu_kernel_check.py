"""GPU checks of the packed CUDA kernels, for one lent device run (``bench/gpu_validate.sh`` calls it).

Steps (each prints one line per check and adds an entry to the JSON written with ``--json``):

* ``env``      versions (python, torch, CUDA, cupy, NVRTC, driver), device name/capability/SMs, which
               ``quantsr_cli`` is imported; exit 3 when the cupy backend cannot run (nothing else is tried).
* ``kernels``  NVRTC compile + load of every kernel entry (seconds each); exactness at real layer sizes
               (IMDN and 64-channel shapes, odd spatial sizes for edge tiles, W2/W4, signed/unsigned codes)
               against a float64 reference built from the documented layout; mma vs dp4a bit agreement;
               kernel-only time of the engine's qsr_conv_tc (every tile shape the tuner tries) and its
               quantize kernel per real layer shape next to cuDNN fp16 channels-last and TF32; the int8 and
               fp16 ``mma.sync`` issue ceilings of this GPU (micro-kernel).

Example::

    python bench/gpu_kernel_check.py env --json /tmp/env.json
    python bench/gpu_kernel_check.py kernels --json /tmp/kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS: dict[str, Any] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def record(key: str, value: Any) -> None:
    RESULTS[key] = value


# ------------------------------------------------------------------------------------------------ env


def step_env() -> int:
    import torch

    import quantsr_cli
    from quantsr_cli.backends import cupy_backend as cb
    from quantsr_cli.errors import BackendUnavailableError

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "quantsr_cli": quantsr_cli.__file__,
                            "cuda_available": torch.cuda.is_available()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,"
                              "clocks.mem,memory.total,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["cupy_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_driver"] = cupy.cuda.runtime.driverGetVersion()
        from cupy.cuda import nvrtc

        info["nvrtc"] = ".".join(str(v) for v in nvrtc.getVersion())
    except Exception as exc:  # noqa: BLE001 - report anything
        info["cupy_error"] = f"{type(exc).__name__}: {exc}"
    ok = True
    try:
        cb.check_available()
        info["kernel_path"] = cb.kernel_path(torch.device("cuda", 0))
    except BackendUnavailableError as exc:
        info["backend_error"] = str(exc)
        ok = False
    for k, v in info.items():
        log(f"env {k}: {v}")
    record("env", info)
    log(f"env: {'OK' if ok else 'FAILED: cupy backend cannot run'}")
    return 0 if ok else 3


# ------------------------------------------------------------------------------------------------ kernels


def _events_time(fn: Any, iters: int, warmup: int = 3) -> float:
    """Median seconds per call over ``iters`` single-call CUDA-event timings (after ``warmup`` calls)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _compile_all() -> dict[str, float]:
    import torch

    from quantsr_cli.backends import cupy_backend as cb
    from quantsr_cli.backends import cupy_plan as plan

    out: dict[str, float] = {}
    names = [("qsr_quant_act.cu", "qsr_quantize_act")] + [
        ("qsr_packed_gemm.cu", plan.gemm_kernel_name(p, b, s)) for p in plan.PATHS for b in (2, 4) for s in (True, False)]
    idx = torch.cuda.current_device()
    for file, kernel in names:
        t0 = time.perf_counter()
        try:
            cb._function(file, kernel, idx)
            out[kernel] = round(time.perf_counter() - t0, 2)
            log(f"nvrtc {kernel}: compiled+loaded in {out[kernel]:.2f} s")
        except Exception as exc:  # noqa: BLE001
            out[kernel] = -1.0
            log(f"nvrtc {kernel}: FAILED {exc}")
    return out


def _layer_cases() -> list[Any]:
    sys.path.insert(0, str(REPO / "tests" / "kernel_shim"))
    from kernel_harness import Case

    # (name, kind, n, c, h, w, o, k, w_bits, a_bits, signed, zero, ...): real layer sizes, odd H/W for edge tiles
    return [
        Case("imdn_c1_64_64_3x3_w4a4u", "conv", 1, 64, 61, 83, 64, 3, 4, 4, False, 7.5),
        Case("imdn_c2_48_64_3x3_w4a4s", "conv", 2, 48, 37, 45, 64, 3, 4, 4, True, 8.0, channels_last=True),
        Case("imdn_c4_48_16_3x3_w2a2u", "conv", 1, 48, 53, 67, 16, 3, 2, 2, False, 1.5),
        Case("imdn_c5_64_64_1x1_w2a2s", "conv", 2, 64, 40, 33, 64, 1, 2, 2, True, 2.0),
        Case("imdn_fuse_384_64_1x1_w4a4u", "conv", 1, 384, 29, 31, 64, 1, 4, 4, False, 7.5, per_channel=False),
        Case("c64_64_3x3_w2a2u_fused", "conv", 1, 64, 64, 64, 64, 3, 2, 2, False, 1.5, relu=True, residual=True,
             out_codes=True),
        Case("c64_64_3x3_w4a8s", "conv", 1, 64, 31, 29, 64, 3, 4, 8, True, 8.0),
        Case("lin_96_192_w4a4s", "linear", 1000, 96, 1, 1, 192, 1, 4, 4, True, 7.5),
    ]


def _check_exactness(path: str) -> list[dict[str, Any]]:
    """Each case through the backend (``impl``) and through ``run_packed`` (fused epilogue) vs float64."""
    import os

    import torch

    from kernel_harness import make_data, packed_module
    from quantsr_cli.backends import cupy_backend as cb

    os.environ["QUANTSR_CUPY_KERNEL"] = path
    rows = []
    for case in _layer_cases():
        entry: dict[str, Any] = {"case": case.name, "path": path}
        try:
            d = make_data(case)
            module = packed_module(case, d).cuda()
            conv = case.kind == "conv"
            x = d["x"].cuda()
            if case.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ref = d["ref_y"]  # float64 NHWC, from the documented layout (fake-quant activations, dequant weights)
            if not (case.relu or case.residual or case.out_codes):
                module.impl = cb.prepare(module)
                got = module(x if conv else x.reshape(-1, case.c))
                got = (got.permute(0, 2, 3, 1) if conv else got.reshape(ref.shape)).double().cpu()
            else:
                codes = cb.quantize_codes(x, tuple(int(s) for s in x.stride()), (d["n"], case.c, d["h"], d["w"]),
                                          d["step"], d["qmin"], d["qmax"], torch.from_numpy(d["shift"]).cuda())
                shift = None if d["next_shift"] is None else torch.from_numpy(d["next_shift"]).cuda()
                res = None if d["residual"] is None else torch.from_numpy(d["residual"]).cuda()
                y, nxt = cb.run_packed(module, codes, d["geom"], relu=case.relu, residual=res,
                                       next_act=(d["next_step"], d["next_qmin"], d["next_qmax"], shift)
                                       if case.out_codes else None)
                got = y.double().cpu()
                if nxt is not None:
                    want = torch.clamp(torch.round((y.cpu() + d["next_shift_t"]) / d["next_step"]),
                                       d["next_qmin"], d["next_qmax"])
                    entry["code_mismatches"] = int((nxt.cpu().to(torch.int64) != want.to(torch.int64)).sum())
            err = float((got - ref).abs().max())
            tol = 2e-6 * max(1.0, float(ref.abs().max())) + 1e-6
            entry.update(max_abs_err=err, tol=tol, ok=err <= tol and entry.get("code_mismatches", 0) == 0)
            entry["y"] = got  # kept for the mma/dp4a comparison, dropped before JSON
        except Exception as exc:  # noqa: BLE001 - a sticky CUDA error shows up in every later case too
            entry.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        log(f"exact {path} {case.name}: {'OK' if entry['ok'] else 'FAIL'} "
            f"err={entry.get('max_abs_err', float('nan')):.2e} {entry.get('error', '')}")
        rows.append(entry)
    return rows


def _kernel_time(fn: Any, k: int = 20) -> tuple[float, str]:
    """Seconds per call of ``fn``: ``k`` calls captured in one CUDA graph, median of 10 replays / ``k``
    (no host cost in the number); falls back to ``k`` eager calls between two events."""
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(k):
                fn()
        return _events_time(graph.replay, 10, warmup=2) / k, "graph"
    except Exception:  # noqa: BLE001 - capture unsupported: eager loop
        torch.cuda.synchronize()

        def loop() -> None:
            for _ in range(k):
                fn()

        return _events_time(loop, 5, warmup=1) / k, "eager"


def _timing_rows(sizes: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """Kernel-only time per layer shape: the engine's qsr_conv_tc (every tuning candidate; codes in, binary16
    out), its binary16 quantize kernel, and cuDNN fp16 channels-last (+ fp32/TF32 for reference)."""
    import torch
    import torch.nn.functional as F

    from quantsr_cli.backends import engine_plan as ep
    from quantsr_cli.backends.engine_layers import ActParams, TcLayer
    from quantsr_cli.backends.engine_runtime import candidates, launch, max_ctas

    shapes = [("conv3x3_64_64", 64, 64, 3), ("conv3x3_48_64", 48, 64, 3), ("conv3x3_48_16", 48, 16, 3),
              ("conv1x1_64_64", 64, 64, 1), ("conv1x1_384_64", 384, 64, 1)]
    rows = []
    for n, h, w in sizes:
        for name, c, o, k in shapes:
            dev = torch.device("cuda")
            layer = TcLayer(c, o, k, torch.randint(-15, 16, (o, k * k * c), dtype=torch.int8, device=dev),
                            torch.full((o,), 0.01, device=dev), torch.zeros(o, device=dev),
                            ActParams(0.1, 0, 15, None))
            m = n * h * w
            codes = torch.randint(0, 16, (m, c), dtype=torch.uint8, device=dev)
            y = torch.empty((m, o), dtype=torch.float16, device=dev)
            epi = ep.Epilogue(layer.scale, layer.bias, yf=y, yf_ld=o, yf_c1=o)
            macs = m * c * o * k * k
            row: dict[str, Any] = {"shape": name, "n": n, "h": h, "w": w, "gmac": macs / 1e9, "tc": {}}
            for spec in candidates(layer, False):
                lp = ep.plan_conv_tc(spec, codes, layer.wq, epi, n=n, h=h, w=w, o=o, max_ctas=max_ctas(spec, dev))
                t, how = _kernel_time(lambda lp=lp: launch(lp, dev))
                row["tc"][f"w{spec.warps}m{spec.wm}"] = {"us": t * 1e6, "int8_peak_pct": 100 * macs / t / 989.5e12,
                                                         "ctas": lp.grid[0], "timed": how}
            best = min(row["tc"].items(), key=lambda kv: kv[1]["us"])
            x16 = torch.randn(n, c, h, w, device=dev).half().contiguous(memory_format=torch.channels_last)
            w16 = torch.randn(o, c, k, k, device=dev).half().contiguous(memory_format=torch.channels_last)
            row["cudnn_fp16_cl_us"] = _kernel_time(lambda: F.conv2d(x16, w16, padding=k // 2))[0] * 1e6
            row["cudnn_fp16_peak_pct"] = 100 * macs / (row["cudnn_fp16_cl_us"] / 1e6) / 494.7e12
            x32, w32 = x16.float(), w16.float()
            torch.backends.cudnn.allow_tf32 = True
            row["cudnn_tf32_cl_us"] = _kernel_time(lambda: F.conv2d(x32, w32, padding=k // 2))[0] * 1e6
            torch.backends.cudnn.allow_tf32 = False
            x_nhwc = x16.permute(0, 2, 3, 1).reshape(m, c)
            qout = torch.empty((m, c), dtype=torch.uint8, device=dev)
            qlp = ep.plan_quant_nhwc(x_nhwc, qout, m=m, hw=h * w, c=c, x_ld=c, x_off=0, step=0.1, qmin=0, qmax=15)
            row["quant_f16_us"] = _kernel_time(lambda: launch(qlp, dev))[0] * 1e6
            row["best_tc"] = best[0]
            row["tc_vs_cudnn_fp16"] = row["cudnn_fp16_cl_us"] / best[1]["us"]
            rows.append(row)
            cands = " ".join(f"{k2}={v['us']:.1f}" for k2, v in row["tc"].items())
            log(f"time {name} {n}x{h}x{w}: tc best {best[0]} {best[1]['us']:.1f} us "
                f"({best[1]['int8_peak_pct']:.0f}% int8 peak) [{cands}] | cudnn fp16 {row['cudnn_fp16_cl_us']:.1f} us "
                f"({row['cudnn_fp16_peak_pct']:.0f}% fp16 peak), tf32 {row['cudnn_tf32_cl_us']:.1f} | "
                f"x{row['tc_vs_cudnn_fp16']:.2f} vs fp16 | quantize f16 {row['quant_f16_us']:.1f} us")
        torch.cuda.empty_cache()
    return rows


_PEAK_SRC = r"""
extern "C" __global__ void mma_s8_peak(int* out, int iters) {
  unsigned a0 = threadIdx.x, a1 = a0 * 3u, a2 = a0 * 5u, a3 = a0 * 7u, b0 = a0 ^ 0x55u, b1 = a0 ^ 0x33u;
  int d[8][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                   : "+r"(d[j][0]), "+r"(d[j][1]), "+r"(d[j][2]), "+r"(d[j][3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  int s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
extern "C" __global__ void mma_f16_peak(float* out, int iters) {
  unsigned a0 = threadIdx.x, a1 = a0 * 3u, a2 = a0 * 5u, a3 = a0 * 7u, b0 = a0 ^ 0x55u, b1 = a0 ^ 0x33u;
  float d[8][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                   : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
                   : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
"""


def _mma_peak() -> dict[str, Any]:
    """Tensor-core issue ceiling of ``mma.sync`` on this GPU: 8 independent accumulator chains per warp."""
    import cupy as cp
    import torch

    mod = cp.RawModule(code=_PEAK_SRC, options=("--std=c++17",))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out: dict[str, Any] = {}
    for name, macs_per_mma, peak in (("mma_s8_peak", 16 * 8 * 32, 989.5e12), ("mma_f16_peak", 16 * 8 * 16, 494.7e12)):
        fn = mod.get_function(name)
        blocks, threads, iters = sms * 8, 256, 4096
        buf = cp.zeros(blocks * threads, dtype=cp.float32)
        fn((blocks,), (threads,), (buf, cp.int32(iters)))
        cp.cuda.runtime.deviceSynchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        best = float("inf")
        for _ in range(5):
            start.record()
            fn((blocks,), (threads,), (buf, cp.int32(iters)))
            end.record()
            end.synchronize()
            best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)
        macs = blocks * (threads // 32) * iters * 8 * macs_per_mma
        out[name] = {"tmacs": macs / best / 1e12, "pct_of_dense_peak": 100 * macs / best / peak}
        log(f"peak {name}: {macs / best / 1e12:.1f} T MAC/s = {100 * macs / best / peak:.1f}% of the datasheet dense peak")
    return out


def step_kernels() -> int:
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sys.path.insert(0, str(REPO / "tests" / "kernel_shim"))
    record("nvrtc_seconds", _compile_all())
    failures = 0
    exact: dict[str, list[dict[str, Any]]] = {}
    for path in ("mma", "dp4a"):
        exact[path] = _check_exactness(path)
        failures += sum(not r["ok"] for r in exact[path])
    agree = []
    for a, b in zip(exact["mma"], exact["dp4a"]):
        same = "y" in a and "y" in b and bool(torch.equal(a["y"], b["y"]))
        agree.append({"case": a["case"], "mma_equals_dp4a": same})
        failures += not same
        log(f"agree {a['case']}: mma == dp4a bit for bit: {same}")
    for rows in exact.values():
        for r in rows:
            r.pop("y", None)
    record("exactness", exact)
    record("mma_vs_dp4a", agree)
    import os

    os.environ.pop("QUANTSR_CUPY_KERNEL", None)
    for name, fn in (("mma_peak", _mma_peak), ("timing", lambda: _timing_rows([(1, 256, 256), (1, 768, 1024)]))):
        try:
            record(name, fn())
        except Exception as exc:  # noqa: BLE001
            record(name, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            log(f"{name}: FAILED {type(exc).__name__}: {exc}")
    log(f"kernels: {'OK' if failures == 0 else f'{failures} FAILED'}")
    return 0 if failures == 0 else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("env", "kernels"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    rc = step_env() if args.step == "env" else step_kernels()
    if args.json is not None:
        args.json.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()

"""GPU inference benchmark: torch fp16 channels-last + CUDA graph vs packed W4A4 / W2A2 on the ``cupy`` engine.

Models (``--models``):

* ``imdn``       IMDN x4: the bundled packed models ``default`` (W4A4) and ``default-w2`` (W2A2); the float
                 baselines run an IMDN x4 of the same shape (random weights: speed does not depend on them);
* ``quantsr-c``  QuantSR-C x4 with 16 blocks, random weights, quantized with RBD at W4A4 and W2A2,
                 quantizers calibrated on one random batch, packed.

For every LR size in ``--sizes`` (``WxH``, default ``256x256,1024x768``) and batch in ``--batches``
(default ``1,8``) the variants are timed **interleaved** (one call of each per round, ``--repeat`` rounds
after ``--warmup``; CUDA events, synchronised), min and median ms per image:

* ``tf32``            float model, NCHW, cuDNN's default TF32; ``fp32`` (TF32 off) only at the first size;
* ``fp16``            float model in half precision, channels-last, eager;
* ``fp16_graph``      the same captured once as a CUDA graph: **the baseline** of ``speedup``;
* ``cupy_W?A?``       the packed model on the ``cupy`` backend as ``quantsr upscale --backend cupy`` runs it:
                      the engine's fused plan, precision ``mixed`` (float32 where values feed quantizers),
                      CUDA graph per input shape, float32 output;
* ``cupy_W?A?_fp16``  the same with ``QUANTSR_ENGINE_PRECISION=fp16`` (all float glue binary16);
* ``cupy_W4A4_eager`` (first size, batch 1 only) the engine without CUDA graphs.

``--psnr`` adds Set5/Set14 x4 PSNR of the bundled models on the ``torch`` backend (TF32 off) and on the cupy
engine in both precisions (needs ``$QUANTSR_DATA/benchmarks`` or ``--data-root``). ``--profile`` adds the top
kernels of one eager forward of the engine and of the fp16 baseline at the largest size, batch 1 (torch
profiler). Results go to ``--json`` (default ``bench/results/gpu_inference.json``) with the device, driver,
clocks and code version. Without CUDA or cupy it prints ``speedup_vs_fp16=unavailable (<reason>)`` and exits
0. Example::

    python bench/gpu_inference.py --models imdn --sizes 256x256 --batches 1 --repeat 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Unavailable(Exception):
    """The benchmark cannot run here; the message says why."""


def code_version() -> str:
    """``git describe`` of the checkout (``$QUANTSR_CODE_VERSION`` where there is no .git) + package version."""
    env = os.environ.get("QUANTSR_CODE_VERSION")
    if env:
        return env
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except ImportError:
        pass
    info["driver"] = _smi("driver_version")
    return info


def _smi(fields: str) -> str:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def _check() -> None:
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    from quantsr_cli.backends import cupy_backend
    from quantsr_cli.errors import BackendUnavailableError

    try:
        cupy_backend.check_available()
    except BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from exc


# ------------------------------------------------------------------------------------------------ models


def _calibrated_packed(fp: Any, bits: int, method: str) -> Any:
    import torch

    from quantsr_cli.config import QuantConfig
    from quantsr_cli.packing.io import to_packed
    from quantsr_cli.quant import quantize_

    qat = copy.deepcopy(fp).cpu()
    quantize_(qat, QuantConfig(method, bits, bits))
    qat.train()
    with torch.no_grad():
        qat(torch.rand(2, 3, 48, 48))  # lazy quantizer initialisation = calibration on a random batch
    return to_packed(qat.eval()).eval()


def build_models(name: str, method: str) -> tuple[Any, dict[str, Any]]:
    """(float model, {"W4A4": packed, "W2A2": packed}) on the CPU."""
    from quantsr_cli.engine.modelio import load_model
    from quantsr_cli.models import build_model

    if name == "imdn":
        fp = build_model("imdn", upscale=4).eval()
        return fp, {"W4A4": load_model("default").model, "W2A2": load_model("default-w2").model}
    if name == "quantsr-c":
        fp = build_model("quantsr-c", upscale=4, num_block=16).eval()
        return fp, {f"W{b}A{b}": _calibrated_packed(fp, b, method) for b in (4, 2)}
    raise SystemExit(f"unknown model {name!r}; choose imdn or quantsr-c")


# ------------------------------------------------------------------------------------------------ timing


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` (no arguments, static inputs) captured once as a CUDA graph; returns the replay closure."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined]  # keep it alive with the closure
    return replay


def time_interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int) -> dict[str, dict[str, float]]:
    """Round-robin timing: per round one synchronised call of each variant. Seconds, min and median."""
    import torch

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) / 1e3)
    return {n: {"min": min(t), "median": statistics.median(t)} for n, t in times.items()}


def engine_model(pm: Any, precision: str, graphs: bool = True) -> Any:
    """A copy of packed model ``pm`` on CUDA with the cupy engine at ``precision``."""
    from quantsr_cli.backends import use_backend
    from quantsr_cli.backends.engine_runtime import runner_of

    model = copy.deepcopy(pm).cuda().eval()
    os.environ["QUANTSR_ENGINE_PRECISION"] = precision
    try:
        use_backend(model, "cupy")
    finally:
        os.environ.pop("QUANTSR_ENGINE_PRECISION", None)
    runner_of(model).use_graphs = graphs
    return model


def bench_config(fp: Any, packed: dict[str, Any], model: str, w: int, h: int, batch: int,
                 args: argparse.Namespace, first: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    import torch

    from quantsr_cli.backends.engine_runtime import runner_of

    x = torch.rand(batch, 3, h, w, device="cuda")
    x16 = x.half().contiguous(memory_format=torch.channels_last)
    fp32 = fp.cuda()
    fp16 = copy.deepcopy(fp).half().to(memory_format=torch.channels_last)
    fns: dict[str, Callable[[], Any]] = {}
    notes: dict[str, str] = {}

    def fp32_call() -> Any:
        torch.backends.cudnn.allow_tf32 = False
        return fp32(x)

    def tf32_call() -> Any:
        torch.backends.cudnn.allow_tf32 = True
        y = fp32(x)
        torch.backends.cudnn.allow_tf32 = False
        return y

    if first:
        fns["fp32"] = fp32_call
    fns["tf32"], fns["fp16"] = tf32_call, lambda: fp16(x16)
    try:
        fns["fp16_graph"] = graphed(lambda: fp16(x16))
    except Exception as exc:  # noqa: BLE001
        notes["fp16_graph"] = f"capture failed: {exc}"
    engines = {}
    for name, pm in packed.items():
        for precision, suffix in (("mixed", ""), ("fp16", "_fp16")):
            em = engine_model(pm, precision)
            with torch.inference_mode():
                em(x)  # first call of this shape: tunes the kernels and captures the CUDA graph
            engines[f"cupy_{name}{suffix}"] = em
            fns[f"cupy_{name}{suffix}"] = lambda em=em: em(x)
        if first and batch == 1 and name == "W4A4":
            em = engine_model(pm, "mixed", graphs=False)
            fns["cupy_W4A4_eager"] = lambda em=em: em(x)
            engines["cupy_W4A4_eager"] = em
    with torch.inference_mode():
        res = time_interleaved(fns, args.repeat, args.warmup)
    base = res.get("fp16_graph", res["fp16"])["min"]
    rows = []
    for name, t in res.items():
        runner = runner_of(engines[name]) if name in engines else None
        note = notes.get(name, "") or (runner.note if runner is not None else "")
        rows.append({"model": model, "lr_w": w, "lr_h": h, "batch": batch, "variant": name,
                     "ms_per_image_min": 1e3 * t["min"] / batch, "ms_per_image_median": 1e3 * t["median"] / batch,
                     "speedup_vs_fp16_graph": base / t["min"], "note": note})
        print(f"{model:10s} {w}x{h} b{batch} {name:16s} {1e3 * t['min'] / batch:9.3f} ms/img (median "
              f"{1e3 * t['median'] / batch:9.3f})  x{base / t['min']:5.2f} vs fp16_graph", flush=True)
    tuned = {}
    for name, em in engines.items():
        r = runner_of(em)
        tuned[name] = {"note": r.note, "choice": {str(k): v.name for k, v in r.tuner.choice.items()},
                       "timings_ms": {str(k): v for k, v in r.tuner.timings.items()}}
    del fns, engines
    torch.cuda.empty_cache()
    return rows, tuned


def check_outputs(packed: dict[str, Any]) -> dict[str, dict[str, float]]:
    """max |cupy - torch| on one 64x48 random input (TF32 off), per packed model and engine precision."""
    import torch

    from quantsr_cli.backends import use_backend

    torch.backends.cudnn.allow_tf32 = False
    x = torch.rand(1, 3, 48, 64, device="cuda")
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, pm in packed.items():
            ref = use_backend(copy.deepcopy(pm).cuda(), "torch")(x).float()
            out[name] = {p: float((engine_model(pm, p)(x).float() - ref).abs().max()) for p in ("mixed", "fp16")}
    return out


def psnr_rows(data_root: str | None) -> list[dict[str, Any]]:
    """Set5/Set14 x4 PSNR/SSIM of the bundled models: torch backend (TF32 off), cupy engine mixed and fp16."""
    import torch

    from quantsr_cli.backends import use_backend
    from quantsr_cli.engine.evaluate import evaluate_model
    from quantsr_cli.engine.modelio import LoadedModel, load_model

    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in ("default", "default-w2"):
        loaded = load_model(name, device="cuda")
        for backend in ("torch", "cupy-mixed", "cupy-fp16"):
            if backend == "torch":
                model = use_backend(loaded.model, "torch")
            else:
                model = engine_model(loaded.model, backend.split("-")[1])
            run_as = LoadedModel(model=model, arch=loaded.arch, scale=loaded.scale, kind=loaded.kind,
                                 source=loaded.source, meta=loaded.meta)
            for ds in ("Set5", "Set14"):
                with torch.inference_mode():
                    r = evaluate_model(run_as, ds, data_root=data_root, bicubic=False)
                rows.append({"model": name, "backend": backend, "dataset": ds, "psnr": r.psnr, "ssim": r.ssim})
                print(f"psnr {name:10s} {backend:10s} {ds:6s} {r.psnr:.4f} dB  SSIM {r.ssim:.4f}", flush=True)
    return rows


def profile_rows(fp: Any, pm: Any, w: int, h: int, top: int = 14) -> dict[str, Any]:
    """Top CUDA kernels (total us) of one eager forward: the engine (mixed) and the fp16 baseline."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.rand(1, 3, h, w, device="cuda")
    fp16 = copy.deepcopy(fp).cuda().half().to(memory_format=torch.channels_last)
    x16 = x.half().contiguous(memory_format=torch.channels_last)
    em = engine_model(pm, "mixed", graphs=False)
    out = {}
    with torch.inference_mode():
        for name, fn in (("engine_mixed", lambda: em(x)), ("fp16", lambda: fp16(x16))):
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            stats = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    k = ev.name[:70]
                    t, c = stats.get(k, (0.0, 0))
                    stats[k] = (t + ev.device_time, c + 1)
            total = sum(t for t, _ in stats.values())
            ranked = sorted(stats.items(), key=lambda kv: -kv[1][0])[:top]
            out[name] = {"total_us": total, "top": [{"kernel": k, "us": t, "calls": c} for k, (t, c) in ranked]}
            print(f"profile {name} {w}x{h}: {total:.0f} us of kernels", flush=True)
            for k, (t, c) in ranked:
                print(f"   {t:9.1f} us {c:4d}x  {k}", flush=True)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    _check()
    import torch

    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"benchmark": "gpu_inference", "code_version": code_version(), "machine": machine_info(),
                              "settings": {k: v for k, v in vars(args).items() if k != "json"},
                              "clocks_before": _smi("clocks.sm,clocks.mem,temperature.gpu,power.draw"),
                              "rows": [], "max_abs_err_vs_torch": {}}
    print(f"{result['machine'].get('device')} driver {result['machine']['driver']} code {result['code_version']}")
    result["tuning"], result["profile"] = {}, {}
    for model in args.models:
        fp, packed = build_models(model, args.method)
        result["max_abs_err_vs_torch"][model] = check_outputs(packed)
        print(f"{model}: max |cupy - torch| = {result['max_abs_err_vs_torch'][model]}", flush=True)
        for si, (w, h) in enumerate(args.sizes):
            for batch in args.batches:
                try:
                    rows, tuned = bench_config(fp, packed, model, w, h, batch, args, first=si == 0)
                    result["rows"].extend(rows)
                    result["tuning"][f"{model} {w}x{h} b{batch}"] = tuned
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"{model} {w}x{h} b{batch}: out of memory ({str(exc)[:120]})", flush=True)
                    torch.cuda.empty_cache()
        if args.profile:
            w, h = args.sizes[-1]
            try:
                result["profile"][model] = profile_rows(fp, packed["W4A4"], w, h)
            except Exception as exc:  # noqa: BLE001 - the profiler may be unavailable: keep the timings
                result["profile"][model] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"profile: {exc}", flush=True)
    if args.psnr:
        try:
            result["psnr"] = psnr_rows(args.data_root)
        except Exception as exc:  # noqa: BLE001 - data missing etc.: report, keep the timings
            result["psnr_error"] = f"{type(exc).__name__}: {exc}"
            print(f"psnr: {result['psnr_error']}", flush=True)
    result["clocks_after"] = _smi("clocks.sm,clocks.mem,temperature.gpu,power.draw")
    return result


def headline(result: dict[str, Any]) -> str:
    """``speedup_vs_fp16=<fp16_graph / best cupy W4A4>`` at the largest configuration of the first model."""
    rows = [r for r in result["rows"] if "ms_per_image_min" in r]
    if not rows:
        return "speedup_vs_fp16=unavailable (no rows)"
    last = max(rows, key=lambda r: (r["model"] == rows[0]["model"], r["lr_w"] * r["lr_h"], r["batch"]))
    same = [r for r in rows if all(r[k] == last[k] for k in ("model", "lr_w", "lr_h", "batch"))]
    cupy = [r for r in same if r["variant"] in ("cupy_W4A4", "cupy_W4A4_fp16")]
    if not cupy:
        return "speedup_vs_fp16=unavailable (W4A4 not run)"
    best = max(r["speedup_vs_fp16_graph"] for r in cupy)
    return f"speedup_vs_fp16={best:.2f} ({last['model']} {last['lr_w']}x{last['lr_h']} batch {last['batch']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="imdn,quantsr-c", help="comma-separated: imdn, quantsr-c")
    parser.add_argument("--sizes", default="256x256,1024x768", help="comma-separated LR sizes WxH")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--method", default="rbd", help="quantizer for quantsr-c")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--psnr", action="store_true", help="also Set5/Set14 PSNR of the bundled models")
    parser.add_argument("--profile", action="store_true", help="also the top kernels of one eager forward")
    parser.add_argument("--data-root", default=None, help="benchmark folder (default $QUANTSR_DATA/benchmarks)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "gpu_inference.json")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    try:
        result = run(args)
    except Unavailable as exc:
        print(f"speedup_vs_fp16=unavailable ({exc})")
        return
    line = headline(result)
    result["headline"] = line
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, args.json)
    print(line)


if __name__ == "__main__":
    main()

"""GPU inference benchmark: FP32 / FP16 torch vs packed W4A4 / W2A2 models (torch reference and cupy).

Builds ``--arch`` (default ``quantsr-c``, 16 blocks, x4) with random weights; for each of W4A4 and
W2A2 quantizes a copy, calibrates its quantizers on one random batch (CPU, training-mode forward),
packs it and moves it to the GPU. On the same ``--size``x``--size`` LR input, for every batch size in
``--batches`` (default 1 and 8), it times (CUDA events, median of ``--repeat``, after ``--warmup``):

* ``fp32``            the float model, NCHW, cuDNN;
* ``fp16``            the float model in half precision, channels-last input, cuDNN (the baseline);
* ``ref_W?A?``        the packed model on the ``torch`` reference backend (unpack + dequantize + cuDNN);
* ``cupy_W?A?``       the packed model on the ``cupy`` backend (kernels/*.cu, int8 MMA on sm_80+).

Prints ms per image, peak allocated GPU memory, the ratio ``fp16 time / time``, max |cupy - ref|, and
last ``speedup_vs_fp16=<fp16 / cupy_W4A4 at the largest batch>``; without CUDA, cupy or the model
packages it prints ``speedup_vs_fp16=unavailable (<reason>)`` and exits 0. Example::

    python bench/gpu_inference.py --size 256 --batches 1,8 --repeat 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any


class Unavailable(Exception):
    """The benchmark cannot run here; the message says why."""


def _imports() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        raise Unavailable(f"torch is not installed ({exc})") from exc
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA device")
    try:
        from quantsr_cli.backends import cupy_backend, use_backend
        from quantsr_cli.config import QuantConfig
        from quantsr_cli.errors import BackendUnavailableError
        from quantsr_cli.models import build_model
        from quantsr_cli.packing.io import to_packed
        from quantsr_cli.quant import quantize_
    except ImportError as exc:
        raise Unavailable(f"quantsr packages incomplete: {exc}") from exc
    try:
        cupy_backend.check_available()
    except BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from exc
    return {"torch": torch, "use_backend": use_backend, "QuantConfig": QuantConfig, "build_model": build_model,
            "to_packed": to_packed, "quantize_": quantize_}


def _time(m: dict[str, Any], fn: Callable[[], Any], repeat: int, warmup: int) -> tuple[float, float, Any]:
    """(median seconds per call, peak allocated MiB, last output)."""
    torch = m["torch"]
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    peak = torch.cuda.max_memory_allocated() / 2**20
    return statistics.median(times), peak, out


def _packed(m: dict[str, Any], fp: Any, args: argparse.Namespace, bits: int) -> Any:
    torch = m["torch"]
    qat = copy.deepcopy(fp).cpu()
    m["quantize_"](qat, m["QuantConfig"](args.method, bits, bits))
    qat.train()
    with torch.no_grad():
        qat(torch.rand(2, 3, 48, 48))  # lazy quantizer initialisation = calibration on a random batch
    return m["to_packed"](qat.eval()).cuda().eval()


def run(args: argparse.Namespace) -> float:
    m = _imports()
    torch = m["torch"]
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    hparams: dict[str, object] = {"upscale": args.scale}
    if args.num_block:
        hparams["num_block"] = args.num_block
    fp = m["build_model"](args.arch, **hparams).eval()
    packed = {f"W{b}A{b}": _packed(m, fp, args, b) for b in args.bits}
    fp32 = fp.cuda()
    fp16 = copy.deepcopy(fp32).half().to(memory_format=torch.channels_last)
    device = torch.cuda.get_device_name()
    print(f"{device}: {args.arch} x{args.scale}, LR {args.size}x{args.size}, repeat={args.repeat}")
    print(f"{'variant':12s} {'batch':>5s} {'ms/image':>10s} {'peak MiB':>9s} {'fp16/this':>9s}  notes")
    headline = float("nan")
    for batch in args.batches:
        x = torch.rand(batch, 3, args.size, args.size, device="cuda")
        rows: list[tuple[str, float, float, str]] = []
        with torch.inference_mode():
            t, mem, _ = _time(m, lambda: fp32(x), args.repeat, args.warmup)
            rows.append(("fp32", t, mem, ""))
            x16 = x.half().contiguous(memory_format=torch.channels_last)
            t16, mem, _ = _time(m, lambda: fp16(x16), args.repeat, args.warmup)
            rows.append(("fp16", t16, mem, "channels-last, cuDNN"))
            for name, model in packed.items():
                m["use_backend"](model, "torch")
                t, mem, y_ref = _time(m, lambda: model(x), args.repeat, args.warmup)
                rows.append((f"ref_{name}", t, mem, "unpack + dequantize + cuDNN"))
                m["use_backend"](model, "cupy")
                t, mem, y = _time(m, lambda: model(x), args.repeat, args.warmup)
                err = (y.float() - y_ref.float()).abs().max().item()
                rows.append((f"cupy_{name}", t, mem, f"max|cupy - ref| = {err:.2e}"))
                if name == "W4A4":
                    headline = t16 / t
        for name, t, mem, note in rows:
            print(f"{name:12s} {batch:5d} {1000 * t / batch:10.3f} {mem:9.0f} {t16 / t:9.2f}  {note}")
        del x
    return headline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="quantsr-c")
    parser.add_argument("--num-block", type=int, default=16, help="residual blocks (0: arch default)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="LR side in pixels")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--bits", default="4,2", help="comma-separated W=A bit-widths to pack")
    parser.add_argument("--method", default="rbd")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.bits = [int(b) for b in str(args.bits).split(",") if b]
    if args.arch != "quantsr-c" and args.num_block == 16:
        args.num_block = 0
    try:
        speedup = run(args)
    except Unavailable as exc:
        print(f"speedup_vs_fp16=unavailable ({exc})")
        return
    print(f"speedup_vs_fp16={speedup:.2f}" if speedup == speedup else "speedup_vs_fp16=unavailable (W4A4 not run)")


if __name__ == "__main__":
    main()

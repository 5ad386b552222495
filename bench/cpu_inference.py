"""CPU inference benchmark: FP32 model vs packed model (torch reference and ``cpu`` backend).

Builds ``--arch`` (default ``quantsr-c``, 16 blocks, x4) with random weights, quantizes it, calibrates
the quantizers on one random batch (a training-mode forward initialises them), packs it, and times,
on the same input image, one forward of:

* ``fp32``        the float model as torch runs it by default (NCHW),
* ``fp32_cl``     the float model with a channels-last input (best plain-FP32 torch layout, for context),
* ``torch_ref``   the packed model on the ``torch`` reference backend,
* ``cpu``         the packed model on the ``cpu`` backend (oneDNN int8 on the codes).

Prints per-image seconds (best and median of ``--repeat`` round-robin runs; the machine may be shared), the ratios, the max |cpu - reference| and, last,
``speedup_vs_fp32=<fp32 / cpu>``. With ``--out FILE`` the run (seconds, speedups, code version, machine) is
appended to FILE's ``runs`` (``bench/results/cpu_inference.json`` holds the published ones). Example::

    python bench/cpu_inference.py --size 256 --repeat 3 --threads 2 --out bench/results/cpu_inference.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchinfo import code_version, machine
from torch import nn

from quantsr_cli.backends import use_backend
from quantsr_cli.backends.cpu import layer_report
from quantsr_cli.config import QuantConfig
from quantsr_cli.models import build_model
from quantsr_cli.packing.io import to_packed
from quantsr_cli.quant import quantize_


def _time_interleaved(fns: dict[str, Callable[[], torch.Tensor]], repeat: int, warmup: int) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor]]:
    """Run the variants round-robin (so load from other processes hits all alike).

    Returns (best seconds, median seconds, last output) per variant.
    """
    outs = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            outs[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - start)
    best = {n: min(t) for n, t in times.items()}
    return best, {n: statistics.median(t) for n, t in times.items()}, outs


def build(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """(FP32 model, packed model with the same weights), both in eval mode."""
    torch.manual_seed(args.seed)
    hparams: dict[str, object] = {"upscale": args.scale}
    if args.num_block:
        hparams["num_block"] = args.num_block
    fp = build_model(args.arch, **hparams).eval()
    qat = build_model(args.arch, **hparams)
    qat.load_state_dict(fp.state_dict())
    quantize_(qat, QuantConfig(args.method, args.w_bits, args.a_bits))
    qat.train()
    with torch.no_grad():
        qat(torch.rand(2, 3, 48, 48))  # lazy quantizer initialisation = calibration on a random batch
    return fp, to_packed(qat.eval())


def _one_layer(fp: nn.Module, fast: nn.Module, size: int, args: argparse.Namespace) -> dict[str, float]:
    """Context: the first quantized conv alone, FP32 (NCHW, channels-last) vs the cpu backend."""
    name = next((n for n, m in fast.named_modules() if type(m).__name__ == "PackedConv2d"), None)
    if name is None:
        return {}
    conv, packed = fp.get_submodule(name), fast.get_submodule(name)
    feat = torch.rand(1, conv.in_channels, size, size) * 4
    feat_cl = feat.contiguous(memory_format=torch.channels_last)
    variants = {"fp32": lambda: conv(feat), "fp32_cl": lambda: conv(feat_cl), "cpu": lambda: packed(feat_cl)}
    with torch.inference_mode():
        best, _, _ = _time_interleaved(variants, max(3, args.repeat), 1)
    print(f"one conv {name} {tuple(conv.weight.shape)} at {size}x{size}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in best.items())
          + f"; fp32/cpu = {best['fp32'] / best['cpu']:.2f}x, fp32_cl/cpu = {best['fp32_cl'] / best['cpu']:.2f}x")
    return {k: round(v * 1e3, 2) for k, v in best.items()}


def append_run(path: Path, record: dict[str, Any]) -> None:
    """Add ``record`` to the ``runs`` of the JSON file ``path`` (created when missing), atomically."""
    data = json.loads(path.read_text()) if path.is_file() else {"benchmark": "cpu_inference", "runs": []}
    data["runs"].append(record)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="quantsr-c")
    parser.add_argument("--num-block", type=int, default=16, help="residual blocks (0: arch default)")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="LR side in pixels")
    parser.add_argument("--method", default="rbd")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append this run to a results JSON file")
    args = parser.parse_args()
    if args.arch != "quantsr-c" and args.num_block == 16:
        args.num_block = 0
    torch.set_num_threads(args.threads)

    fp, packed = build(args)
    x = torch.rand(1, 3, args.size, args.size)
    print(f"{args.arch} x{args.scale} W{args.w_bits}A{args.a_bits} {args.method}: input {tuple(x.shape)}, "
          f"threads={torch.get_num_threads()}, repeat={args.repeat}")
    ref, fast = packed, copy.deepcopy(packed)
    use_backend(ref, "torch")
    use_backend(fast, "cpu")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants = {"fp32": lambda: fp(x), "fp32_cl": lambda: fp(x_cl), "torch_ref": lambda: ref(x), "cpu": lambda: fast(x)}
    with torch.inference_mode():
        times, medians, outs = _time_interleaved(variants, args.repeat, args.warmup)
    y_fp, y_ref, y_cpu = outs["fp32"], outs["torch_ref"], outs["cpu"]
    fallbacks = {n: note for n, note in layer_report(fast).items() if "fallback" in note}
    print(f"seconds per image: best (median) of {args.repeat} interleaved runs")
    for name, seconds in times.items():
        print(f"{name:10s} {seconds:8.3f} s ({medians[name]:.3f})   fp32/{name} = {times['fp32'] / seconds:5.2f}x")
    conv_ms = _one_layer(fp, fast, x.shape[-1], args)
    diff = (y_cpu - y_ref).abs()
    print(f"max|cpu - torch_ref| = {diff.max().item():.2e}  (pixels > 1e-4: {(diff > 1e-4).float().mean().item():.2e}); "
          f"max|torch_ref - fp32| = {(y_ref - y_fp).abs().max().item():.2e}")
    print(f"layers on reference fallback: {len(fallbacks)}" + "".join(f"\n  {n}: {v}" for n, v in fallbacks.items()))
    print(f"speedup_vs_fp32_channels_last={times['fp32_cl'] / times['cpu']:.2f}")
    print(f"speedup_vs_fp32={times['fp32'] / times['cpu']:.2f}")
    if args.out is not None:
        append_run(args.out, {
            "label": f"{args.arch}" + (f" {args.num_block} blocks" if args.num_block else ""),
            "code_version": code_version(), "machine": machine(args.threads), "arch": args.arch,
            "blocks": args.num_block or None, "scale": args.scale, "bits": f"{args.w_bits}/{args.a_bits}",
            "method": args.method, "size": args.size, "threads": args.threads, "repeat": args.repeat,
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "speedup_vs_fp32": round(times["fp32"] / times["cpu"], 2),
            "speedup_vs_fp32_cl": round(times["fp32_cl"] / times["cpu"], 2),
            **({"one_conv_ms": {"fp32": conv_ms["fp32"], "cpu": conv_ms["cpu"]},
                "one_conv_speedup": round(conv_ms["fp32"] / conv_ms["cpu"], 1)} if conv_ms else {})})


if __name__ == "__main__":
    main()

"""Our QAT models against the best CPU runtimes, side by side (issue #26).

One interleaved run (each round times every row once, so load from other processes hits all alike) of:

* ``torch_fp32`` / ``torch_fp32_cl``  the published FP32 IMDN in torch (NCHW / channels-last input),
* ``ov_fp32`` / ``ov_bf16``           the FP32 model in OpenVINO (f32, and its CPU default bf16),
* ``ort_int8_ptq``                    ONNX Runtime static PTQ of the FP32 model (QDQ, U8S8, per-channel),
* ``ov_int8_nncf``                    OpenVINO int8 PTQ of the FP32 model (NNCF defaults),
* ``<model>_cpu|_ort|_ov``            our packed model (``default``, ``default-w2``) on the ``cpu``,
                                      ``onnxruntime`` and ``openvino`` backends (exact: f32 float layers),
* ``<model>_ov_bf16``                 our OpenVINO IR with bf16 float layers (not exact; for the record),

at 1 and 2 threads on a 256x256 input (whole) and a 1024x768 input (256-pixel tiles, 16 pixels of
context, as ``quantsr upscale``). Each row also gets its Set5/Set14 x4 PSNR (Y, BasicSR conventions)
and its file size. PTQ calibration: 32 LR crops from T91/BSD200 (training data, not the test sets).

Writes ``bench/results/cpu_peers.json`` (machine, versions, ``git describe``, settings, rows, ratios).
Resumable: artifacts (exports, PTQ models), each row's PSNR and each (threads, size) timing group are
cached under ``--cache-dir`` keyed on the code version and the settings; a rerun redoes only what is
missing. Example (the full run)::

    python bench/cpu_peers.py --repeat 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_peers_rows import build_rows  # noqa: E402
from quantsr_cli.data.datasets import BenchmarkDataset, resolve_dataset  # noqa: E402
from quantsr_cli.engine.tiling import upscale_tensor  # noqa: E402
from quantsr_cli.metrics.psnr_ssim import evaluate_pair  # noqa: E402

SIZES = {"256": (256, 256), "1024x768": (768, 1024)}


def code_version() -> str:
    """``git describe``, with ``-dirty`` when a tracked file outside ``bench/results`` (what benchmarks
    write) differs from the commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        return git("describe", "--always", "--tags") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cores": os.cpu_count(), "torch": torch.__version__}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    except OSError:
        pass
    for mod in ("onnxruntime", "openvino", "nncf", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - version is informative only
            info[mod] = None
    return info


class Cache:
    """JSON files under ``root`` keyed by a hash of (code version, kind, settings)."""

    def __init__(self, root: Path, version: str) -> None:
        self.root, self.version = root, version
        root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, settings: dict[str, Any]) -> Path:
        key = json.dumps({"v": self.version, "kind": kind, **settings}, sort_keys=True)
        return self.root / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

    def get(self, kind: str, settings: dict[str, Any]) -> Any:
        path = self.path(kind, settings)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, kind: str, settings: dict[str, Any], value: Any) -> None:
        path = self.path(kind, settings)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, path)


class Runner(nn.Module):
    """An ``nn.Module`` around a row's ``fn(x) -> y`` so tiling and evaluation can call it."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def psnr_of(fn: Callable[[torch.Tensor], torch.Tensor], data_root: str | None) -> dict[str, float]:
    model = Runner(fn)
    out = {}
    for name in ("Set5", "Set14"):
        data = BenchmarkDataset(resolve_dataset(name, data_root), 4)
        values = []
        for _, lr, hr in data:
            with torch.inference_mode():
                sr = upscale_tensor(model, lr, 4, tile=0)
            values.append(evaluate_pair(sr, hr, 4)[0])
        out[name] = float(np.mean(values))
    return out


def time_group(rows: dict[str, Callable[[torch.Tensor], torch.Tensor]], hw: tuple[int, int], repeat: int,
               seed: int = 0) -> dict[str, dict[str, float]]:
    """Interleaved timing: warm-up round, then ``repeat`` rounds over all rows; min and median seconds."""
    torch.manual_seed(seed)
    x = torch.rand(1, 3, *hw)
    models = {name: Runner(fn) for name, fn in rows.items()}
    tile = 0 if max(hw) <= 256 else 256

    def once(model: nn.Module) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            upscale_tensor(model, x, 4, tile=tile, tile_pad=16)
        return time.perf_counter() - start

    for model in models.values():
        once(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeat):
        for name, model in models.items():
            times[name].append(once(model))
    return {n: {"min": min(t), "median": statistics.median(t), "all": t} for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--models", nargs="+", default=["default", "default-w2"])
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--no-psnr", action="store_true", help="skip the Set5/Set14 evaluation")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--fp-weights", default=None, help="FP32 IMDN x4 .pth [default: $QUANTSR_DATA/weights]")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "quantsr" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cpu_peers.json")
    args = parser.parse_args()

    version = code_version()
    cache = Cache(args.cache_dir, version)
    os.environ.setdefault("QUANTSR_CACHE", str(args.cache_dir / "exports"))
    data = os.environ.get("QUANTSR_DATA", str(REPO.parent / "shared" / "data"))
    fp_weights = args.fp_weights or str(Path(data) / "weights" / "IMDN_x4.pth")
    artifacts = args.cache_dir / "artifacts" / version
    artifacts.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"version": version, "machine": machine(), "settings": {
        "repeat": args.repeat, "threads": args.threads, "sizes": args.sizes, "models": args.models,
        "tile": "1024x768: 256 tiles + 16 px context; 256: whole"}, "rows": {}, "load_average": {}}

    built: dict[int, Any] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        built[threads] = build_rows(args.models, fp_weights, artifacts, threads, data)
        if args.rows is not None:
            built[threads].keep(args.rows)
    rows0 = built[args.threads[0]]
    for name in rows0.names():
        result["rows"][name] = {"what": rows0.what[name], "bytes": rows0.size[name], "times": {}}

    if not args.no_psnr:
        torch.set_num_threads(max(args.threads))
        rows = built[max(args.threads)]
        for name in rows.names():
            settings = {"row": name}
            value = cache.get("psnr", settings)
            if value is None:
                value = psnr_of(rows.fn[name], args.data_root)
                cache.put("psnr", settings, value)
            result["rows"][name]["psnr"] = value
            print(f"psnr {name}: {value}", flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        for size in args.sizes:
            settings = {"threads": threads, "size": size, "repeat": args.repeat, "rows": rows0.names()}
            group = cache.get("time", settings)
            if group is None:
                before = os.getloadavg()[0]
                group = time_group(built[threads].fn, SIZES[size], args.repeat)
                # the 1-minute load average around the group: ~threads on a quiet machine, more when shared
                group = {"rows": group, "load_average": [round(before, 2), round(os.getloadavg()[0], 2)]}
                cache.put("time", settings, group)
            result["load_average"][f"t{threads}_{size}"] = group.get("load_average")
            group = group.get("rows", group)
            for name, t in group.items():
                result["rows"][name]["times"][f"t{threads}_{size}"] = t
            print(f"timed threads={threads} size={size}", flush=True)

    result["ratios"] = ratios(result["rows"], args.models)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print_table(result)


def ratios(rows: dict[str, Any], models: list[str]) -> dict[str, Any]:
    """Per model: the fastest quantsr backend per setting and its speed relative to OpenVINO int8 PTQ."""
    out: dict[str, Any] = {}
    ref = rows.get("ov_int8_nncf", {}).get("times", {})
    for model in models:
        ours = {n: r for n, r in rows.items() if n.startswith(model + "_") and not n.endswith("_bf16")}  # exact rows
        for key in ref:
            best = min(ours, key=lambda n: ours[n]["times"].get(key, {}).get("min", float("inf")), default=None)
            if best is None or key not in ours[best]["times"]:
                continue
            t_best = ours[best]["times"][key]
            out[f"{model}/{key}"] = {"fastest": best, "vs_ov_int8_nncf_min": ref[key]["min"] / t_best["min"],
                                     "vs_ov_int8_nncf_median": ref[key]["median"] / t_best["median"]}
    return out


def print_table(result: dict[str, Any]) -> None:
    rows = result["rows"]
    keys = sorted({k for r in rows.values() for k in r["times"]})
    base = rows.get("torch_fp32", {}).get("times", {})
    print(f"{result['version']} | {result['machine'].get('cpu', '')} | min (median) seconds; x = torch_fp32/row")
    print(f"{'row':22s} {'Set5':>6s} {'Set14':>6s} {'MB':>5s} " + " ".join(f"{k:>22s}" for k in keys))
    for name, row in rows.items():
        psnr = row.get("psnr", {})
        cells = []
        for k in keys:
            t = row["times"].get(k)
            speed = f"{base[k]['min'] / t['min']:.2f}x" if t and k in base else ""
            cells.append(f"{t['min']:.3f} ({t['median']:.3f}) {speed:>6s}" if t else "")
        print(f"{name:22s} {psnr.get('Set5', float('nan')):6.2f} {psnr.get('Set14', float('nan')):6.2f} "
              f"{(row['bytes'] or 0) / 1e6:5.2f} " + " ".join(f"{c:>22s}" for c in cells))
    for key, value in result["ratios"].items():
        print(f"{key}: fastest {value['fastest']}, speed vs ov_int8_nncf {value['vs_ov_int8_nncf_min']:.2f}x (min), "
              f"{value['vs_ov_int8_nncf_median']:.2f}x (median)")


if __name__ == "__main__":
    main()

"""Load: ``upscale`` of many images and of a large one runs in bounded memory at a steady pace, without
leaking file handles.

Peak RSS is measured for a real ``python -m quantsr_cli`` run, as ``RUSAGE_CHILDREN`` of a wrapper
process whose only child is the CLI. The pace is read from the outputs' modification times (each file
is renamed into place when it is complete). The default run uses 20 small images and one 1200x900
image with generous bounds; ``-m slow`` runs 200 images and one 4000x3000 image (and prints the
numbers in `bench/results/memory.json`, shown in `docs/results.md`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from .forkcli import REPO, base_env
from .helpers import fresh_dir, read_any, write_png

_WRAPPER = r"""
import json, resource, subprocess, sys, time
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
t = time.perf_counter()
r = subprocess.run([sys.executable, "-m", "quantsr_cli", *sys.argv[2:]], capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "wall_s": time.perf_counter() - t, "stderr": r.stderr[-3000:],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measure(*args: str, nofile: int = 0) -> dict:
    """Run the CLI once; returns rc, wall_s, stderr and the CLI's peak RSS in MiB (Linux ru_maxrss is KiB)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, str(nofile), *args], cwd=REPO, env=base_env(),
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like (smooth, compressible) 8-bit RGB image."""
    rng = np.random.default_rng(seed)
    small = (rng.random((max(h // 16, 2), max(w // 16, 2), 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def folder_of(path: Path, n: int, h: int, w: int) -> Path:
    fresh_dir(path)
    for i in range(n):
        write_png(path / f"im_{i:03d}.png", smooth_image(h, w, i))
    return path


def intervals(folder: Path) -> list[float]:
    """Seconds between consecutive completed outputs (rename times), in completion order."""
    times = sorted(p.stat().st_mtime_ns for p in folder.iterdir())
    return [(b - a) / 1e9 for a, b in zip(times, times[1:])]


def float_output_mb(h: int, w: int, scale: int) -> float:
    """Size of one float32 RGB output canvas (the unavoidable working set of one image), MiB."""
    return h * scale * w * scale * 3 * 4 / 2**20


def check_folder_run(tmp_path: Path, model: Path, n: int, nofile: int = 0) -> dict:
    src = folder_of(tmp_path / f"in{n}", n, 64, 80)
    out = tmp_path / f"out{n}"
    m = measure("upscale", str(src), "-o", str(out), "--model", str(model), "--tile", "32", nofile=nofile)
    assert m["rc"] == 0, m["stderr"]
    assert len(list(out.iterdir())) == n and read_any(out / "im_000.png").shape == (128, 160, 3)
    steps = intervals(out)
    third = max(len(steps) // 3, 1)
    m["first_ms"] = 1000 * statistics.median(steps[:third])
    m["last_ms"] = 1000 * statistics.median(steps[-third:])
    return m


def check_large_run(tmp_path: Path, model: Path, h: int, w: int) -> dict:
    src = tmp_path / f"large_{w}x{h}.png"
    write_png(src, smooth_image(h, w, 99))
    out = tmp_path / f"large_{w}x{h}_x2.png"
    m = measure("upscale", str(src), "-o", str(out), "--model", str(model), "--tile", "256")
    assert m["rc"] == 0, m["stderr"]
    assert read_any(out).shape == (2 * h, 2 * w, 3)
    m["float_output_mb"] = float_output_mb(h, w, 2)
    return m


def report(label: str, m: dict) -> None:
    keys = ("maxrss_mb", "wall_s", "first_ms", "last_ms", "float_output_mb")
    print(f"\n[load] {label}: " + ", ".join(f"{k}={m[k]:.1f}" for k in keys if k in m))


def test_no_file_handle_leak_in_process(tiny_models, tmp_path: Path) -> None:
    from quantsr_cli.engine.modelio import load_model
    from quantsr_cli.engine.upscale import UpscaleOptions, run_upscale

    src = folder_of(tmp_path / "in", 20, 24, 32)
    loaded = load_model(str(tiny_models["packed"]))
    run_upscale(loaded, [str(src)], str(tmp_path / "warm"), UpscaleOptions())  # first-use imports, caches
    before = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    for k in range(3):
        res = run_upscale(loaded, [str(src)], str(tmp_path / f"out{k}"), UpscaleOptions(tile=16, tile_pad=4))
        assert len(res.written) == 20 and not res.failed
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before


def baseline_rss_mb() -> float:
    """Peak RSS of a CLI that only prints its help: torch and the app imported, nothing run. The torch
    build alone decides most of it (~300 MiB for a CPU wheel, ~650 MiB for a CUDA one)."""
    return measure("--help")["maxrss_mb"]


def test_folder_of_20_and_a_1200x900_image(tiny_models, tmp_path: Path) -> None:
    base = baseline_rss_mb()
    folder = check_folder_run(tmp_path, tiny_models["packed"], 20)
    report("20 images 80x64", folder)
    # the run's own cost (model, backend runtime such as OpenVINO's compiler, tiles) stays under 512 MiB
    assert folder["maxrss_mb"] < base + 512, (base, folder["maxrss_mb"])
    assert folder["last_ms"] <= 3 * folder["first_ms"] + 50  # no slow-down as images accumulate
    large = check_large_run(tmp_path, tiny_models["packed"], 900, 1200)
    report("one 1200x900 image", large)
    assert large["maxrss_mb"] < base + 512 + 4 * large["float_output_mb"], (base, large["maxrss_mb"])


@pytest.mark.slow
def test_folder_of_200_images_bounded_memory_steady_pace_no_fd_leak(tiny_models, tmp_path: Path) -> None:
    small = check_folder_run(tmp_path, tiny_models["packed"], 20)
    # 200 images with only 64 file descriptors allowed: a handle leaked per image would fail the run
    large = check_folder_run(tmp_path, tiny_models["packed"], 200, nofile=64)
    report("20 images 80x64", small)
    report("200 images 80x64 (RLIMIT_NOFILE=64)", large)
    assert large["maxrss_mb"] <= small["maxrss_mb"] + 64  # memory does not grow with the number of images
    assert large["last_ms"] <= 2 * large["first_ms"] + 20  # the last third as fast as the first


@pytest.mark.slow
def test_4000x3000_image_bounded_memory(tiny_models, tmp_path: Path) -> None:
    base = measure("upscale", str(write_png(tmp_path / "tiny.png", smooth_image(8, 8, 1))), "-o",
                   str(tmp_path / "tiny_x2.png"), "--model", str(tiny_models["packed"]))
    large = check_large_run(tmp_path, tiny_models["packed"], 3000, 4000)
    report("baseline (8x8 image)", base)
    report("one 4000x3000 image", large)
    # the float32 output canvas (~550 MiB at x2) dominates; everything else is bounded by tiles/planes
    assert large["maxrss_mb"] <= base["maxrss_mb"] + 2.0 * large["float_output_mb"]

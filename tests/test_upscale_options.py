"""`quantsr upscale` options users know from Real-ESRGAN: --outscale, --alpha-upsampler, --quality, --half,
--threads, tile progress; and a one-line error for a CUDA device that this torch build cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.upscale import UpscaleOptions, run_upscale
from quantsr_cli.errors import ConfigError
from tests.conftest import run_cli


def _write(path: Path, arr: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    buf.tofile(str(path))
    return path


@pytest.fixture()
def rgba(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    img = (rng.random((21, 34, 4)) * 255).astype(np.uint8)
    img[:, :17, 3] = 255
    img[:, 17:, 3] = 0
    return _write(tmp_path / "logo.png", img)


@pytest.mark.parametrize("outscale", ["3", "2.5"])
def test_outscale_gives_exactly_that_scale(tmp_path: Path, rgba: Path, outscale: str) -> None:
    dst = tmp_path / f"out{outscale}.png"
    res = run_cli("upscale", str(rgba), "-o", str(dst), "--outscale", outscale)
    assert res.returncode == 0, res.stderr
    out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    s = float(outscale)
    assert out.shape == (int(21 * s), int(34 * s), 4)  # alpha resized with the colour
    x4 = tmp_path / "x4.png"
    assert run_cli("upscale", str(rgba), "-o", str(x4)).returncode == 0
    ref = cv2.imread(str(x4), cv2.IMREAD_UNCHANGED)
    want = cv2.resize(ref, (int(34 * s), int(21 * s)), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(out, want)  # the model's x4 output, resized: nothing else changes


def test_alpha_to_jpeg_warns_and_quality_applies(tmp_path: Path, rgba: Path) -> None:
    lo, hi = tmp_path / "lo.jpg", tmp_path / "hi.jpg"
    res = run_cli("upscale", str(rgba), "-o", str(lo), "--quality", "20", "--json")
    assert res.returncode == 0, res.stderr
    assert "warning:" in res.stderr and "JPG has no alpha channel" in res.stderr
    assert json.loads(res.stdout)["warnings"] and json.loads(res.stdout)["written"] == [str(lo)]
    assert run_cli("upscale", str(rgba), "-o", str(hi), "--quality", "98").returncode == 0
    assert lo.stat().st_size < hi.stat().st_size
    png = run_cli("upscale", str(rgba), "-o", str(tmp_path / "keep.png"))
    assert "warning" not in png.stderr
    assert run_cli("upscale", str(rgba), "-o", str(tmp_path / "x.jpg"), "--quality", "101").returncode == 2


def test_alpha_upsampler_model_runs_the_model_on_alpha(tmp_path: Path, rgba: Path) -> None:
    loaded = load_model("default")
    out = {}
    for mode in ("bicubic", "model"):
        dst = tmp_path / f"{mode}.png"
        report = run_upscale(loaded, [str(rgba)], str(dst), UpscaleOptions(alpha_upsampler=mode))
        assert report.written == [str(dst)]
        out[mode] = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out["bicubic"][:, :, :3], out["model"][:, :, :3])  # colour unchanged
    a_b, a_m = out["bicubic"][:, :, 3].astype(int), out["model"][:, :, 3].astype(int)
    assert not np.array_equal(a_b, a_m)
    assert a_m[:, :60].min() >= 230 and a_m[:, 76:].max() <= 25  # the model keeps the hard edge's two sides
    with pytest.raises(ConfigError, match="alpha-upsampler"):
        UpscaleOptions(alpha_upsampler="lanczos")


def test_tile_progress_events(tmp_path: Path) -> None:
    src = _write(tmp_path / "big.png", (np.random.default_rng(4).random((40, 70, 3)) * 255).astype(np.uint8))
    events: list[dict] = []
    run_upscale(load_model("default"), [str(src)], str(tmp_path / "o.png"), UpscaleOptions(tile=16, tile_pad=4),
                on_event=events.append)
    tiles = [e for e in events if e["event"] == "tile"]
    assert [e["tile"] for e in tiles] == list(range(1, 16)) and all(e["tiles"] == 15 for e in tiles)
    assert events[-1]["event"] == "image" and events[-1]["index"] == 1


def test_device_and_half_errors_are_one_line(tmp_path: Path, rgba: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    for cmd in (["upscale", str(rgba), "-o", str(tmp_path / "o.png")], ["eval", "--dataset", str(tmp_path)]):
        res = run_cli(*cmd, "--device", "cuda")
        assert res.returncode == 1 and not (tmp_path / "o.png").exists()
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "--device cuda: CUDA is not available" in lines[0], res.stderr
    res = run_cli("upscale", str(rgba), "-o", str(tmp_path / "h.png"), "--half")
    assert res.returncode == 1 and "--half runs on the GPU engine" in res.stderr
    assert run_cli("upscale", str(rgba), "-o", str(tmp_path / "t.png"), "--threads", "1").returncode == 0

"""`quantsr upscale`, `pack` and `info` through the real CLI on a small packed model."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quantsr_cli.config import QuantConfig
from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.tiling import upscale_tensor
from quantsr_cli.models import build_model
from quantsr_cli.packing import io as packing_io
from quantsr_cli.quant import quantize_
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibrated quantsr-c x2 (2 blocks) W4A4: its qat file and its packed file."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models")
    model = build_model("quantsr-c", upscale=2, num_block=2)
    quant = QuantConfig("rbd", 4, 4)
    quantize_(model, quant)
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 24, 24))
    model.eval()
    qat, packed = folder / "qat.safetensors", folder / "packed.safetensors"
    packing_io.save_model(model, qat, quant)
    packing_io.save_model(model, packed, quant, pack=True)
    return {"qat": qat, "packed": packed}


def _write(path: Path, arr: np.ndarray) -> None:
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    buf.tofile(str(path))


def test_upscale_single_file(tmp_path: Path, model_files: dict[str, Path]) -> None:
    src = tmp_path / "in.png"
    _write(src, (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    dst = tmp_path / "out.png"
    result = run_cli("upscale", str(src), "-o", str(dst), "--model", str(model_files["packed"]))
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(dst), cv2.IMREAD_UNCHANGED)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8


def test_upscale_folder_keeps_gray_16bit_alpha_and_reports_bad_files(tmp_path: Path, model_files: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "gray.png", (rng.random((16, 16)) * 255).astype(np.uint8))
    _write(folder / "deep.png", (rng.random((16, 16, 3)) * 65535).astype(np.uint16))
    _write(folder / "alpha.png", (rng.random((16, 16, 4)) * 255).astype(np.uint8))
    (folder / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    result = run_cli("upscale", str(folder), "-o", str(out), "--model", str(model_files["packed"]))
    assert result.returncode == 1  # one input failed, the others were written
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    gray = cv2.imread(str(out / "gray.png"), cv2.IMREAD_UNCHANGED)
    deep = cv2.imread(str(out / "deep.png"), cv2.IMREAD_UNCHANGED)
    alpha = cv2.imread(str(out / "alpha.png"), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (32, 32)
    assert deep.dtype == np.uint16 and deep.shape == (32, 32, 3)
    assert alpha.shape == (32, 32, 4)
    assert not (out / "broken.png").exists()
    again = run_cli("upscale", str(folder / "gray.png"), "-o", str(out), "--model", str(model_files["packed"]),
                    "--skip-existing", "--json")
    assert json.loads(again.stdout)["skipped"] == [str(out / "gray.png")]


def test_output_equal_to_input_is_refused(tmp_path: Path, model_files: dict[str, Path]) -> None:
    src = tmp_path / "same.png"
    _write(src, np.full((8, 8, 3), 77, np.uint8))
    before = src.read_bytes()
    result = run_cli("upscale", str(src), "-o", str(src), "--model", str(model_files["packed"]))
    assert result.returncode == 1 and "equals the input" in result.stderr
    assert src.read_bytes() == before


def test_tiled_output_equals_untiled(model_files: dict[str, Path]) -> None:
    loaded = load_model(str(model_files["packed"]))
    torch.manual_seed(2)
    lr = torch.rand(1, 3, 45, 61)
    whole = upscale_tensor(loaded.model, lr, 2, tile=0)
    tiled = upscale_tensor(loaded.model, lr, 2, tile=16, tile_pad=8)
    assert (whole - tiled).abs().max() <= 1 / 255


def test_pack_and_info(tmp_path: Path, model_files: dict[str, Path]) -> None:
    dst = tmp_path / "p.safetensors"
    result = run_cli("pack", str(model_files["qat"]), "-o", str(dst), "--json")
    assert result.returncode == 0, result.stderr
    info = run_cli("info", str(dst), "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    for key in ("arch", "scale", "params", "quantized_params", "file_bytes", "fp32_bytes", "macs"):
        assert key in report
    assert report["arch"] == "quantsr-c" and report["scale"] == 2
    assert report["quantized_params"] == 2 * 2 * 64 * 64 * 9
    expected = report["quantized_params"] * 4 / 8 + (report["params"] - report["quantized_params"]) * 4
    assert expected <= report["file_bytes"] <= 1.05 * expected  # codes really stored at 4 bits
    qat_out = load_model(str(model_files["qat"])).model(torch.rand(1, 3, 8, 8))
    assert qat_out.shape == (1, 3, 16, 16)


def test_info_of_architecture_counts_swinir_quantized_layers() -> None:
    result = run_cli("info", "--arch", "swinir-s", "--bits", "2", "--json")
    report = json.loads(result.stdout)
    assert report["params"] == 929_628
    assert 0 < report["quantized_params"] < report["params"]
    assert report["equivalent_params"] < report["params"] * 0.25


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "default-w2"])
def test_cpu_backend_gives_reference_psnr_on_set5(name: str, shared_data: Path) -> None:
    ref = run_cli("eval", "--model", name, "--dataset", "Set5", "--backend", "torch", "--json")
    cpu = run_cli("eval", "--model", name, "--dataset", "Set5", "--backend", "cpu", "--json")
    assert ref.returncode == 0 and cpu.returncode == 0, ref.stderr + cpu.stderr
    a = json.loads(ref.stdout)["datasets"]["Set5"]["psnr"]
    b = json.loads(cpu.stdout)["datasets"]["Set5"]["psnr"]
    assert abs(a - b) <= 0.01


BUNDLED_SET5_FLOORS = {"default": 31.70, "default-w2": 31.00}
"""Set5 x4 PSNR (dB) floors of the bundled models: each file's measured value rounded down to 0.01
(quantsr_cli/weights/README.md); a replaced file must not be worse than the one it replaces."""


@pytest.mark.parametrize("name", sorted(BUNDLED_SET5_FLOORS))
def test_bundled_models_keep_their_set5_psnr(name: str, shared_data: Path) -> None:
    from quantsr_cli.engine.evaluate import evaluate_model

    loaded = load_model(name)
    assert loaded.kind == "packed" and loaded.scale == 4
    psnr = evaluate_model(loaded, "Set5", bicubic=False).psnr
    assert psnr >= BUNDLED_SET5_FLOORS[name]

"""``eval``/``upscale --model FILE.onnx|FILE.xml`` run a file ``quantsr export`` wrote, in its runtime."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from quantsr_cli.config import QuantConfig
from quantsr_cli.packing.convert import to_packed
from tests.conftest import REPO, run_cli
from tests.test_export import has_ort, has_ov, qat_model

pytestmark = pytest.mark.skipif(not (has_ov and has_ort), reason="needs onnxruntime and openvino")
EXAMPLE = REPO / "quantsr_cli" / "assets" / "example_lr.png"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quantsr_cli.packing.io import save_model

    folder = tmp_path_factory.mktemp("exported")
    files = {"safetensors": folder / "tiny.safetensors"}
    save_model(to_packed(qat_model("imdn", "rbd", 4, 4)), files["safetensors"], QuantConfig("rbd", 4, 4))
    for ext in ("onnx", "xml"):
        files[ext] = folder / f"tiny.{ext}"
        res = run_cli("export", str(files["safetensors"]), "-o", str(files[ext]))
        assert res.returncode == 0, res.stderr
    return files


def _psnr(model: Path, *extra: str) -> float:
    res = run_cli("eval", "--model", str(model), "-d", "Set5", "--json", *extra)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["datasets"]["Set5"]["psnr"]


def test_eval_of_the_exported_files_equals_the_torch_backend(exported: dict[str, Path], shared_data: Path) -> None:
    ref = _psnr(exported["safetensors"], "--backend", "torch")
    for ext, runtime in (("onnx", "onnxruntime"), ("xml", "openvino")):
        assert abs(_psnr(exported[ext], "--backend", runtime) - ref) <= 0.01, ext


def test_upscale_with_an_exported_file(exported: dict[str, Path], tmp_path: Path) -> None:
    outs = {}
    for key, backend in (("safetensors", "torch"), ("onnx", "auto"), ("xml", "openvino")):
        outs[key] = tmp_path / f"{key}.png"
        res = run_cli("upscale", str(EXAMPLE), "-o", str(outs[key]), "--model", str(exported[key]),
                      "--backend", backend)
        assert res.returncode == 0, res.stderr
    ref = cv2.imread(str(outs["safetensors"])).astype(np.int16)
    for key in ("onnx", "xml"):
        got = cv2.imread(str(outs[key])).astype(np.int16)
        assert got.shape == ref.shape
        assert np.abs(got - ref).mean() < 0.05, key  # the same codes except where a value sits on a boundary
    assert "W4A4 rbd (exported), backend: openvino" in res.stderr


@pytest.mark.parametrize("args", [
    ("upscale", str(EXAMPLE), "-o", "{tmp}/o.png", "--model", "{onnx}", "--backend", "cpu"),
    ("quantize", "--init", "{onnx}", "--iters", "1", "--run-dir", "{tmp}/run"),
    ("pack", "{xml}", "-o", "{tmp}/p.safetensors"),
    ("export", "{xml}", "-o", "{tmp}/again.onnx"),
    ("info", "{onnx}"),
])
def test_exported_files_are_refused_where_they_cannot_run(exported: dict[str, Path], tmp_path: Path,
                                                          args: tuple[str, ...]) -> None:
    filled = [a.format(tmp=tmp_path, onnx=exported["onnx"], xml=exported["xml"]) for a in args]
    res = run_cli(*filled)
    assert res.returncode == 1, res.stderr
    line = res.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: "), line
    assert "exported model" in line
    assert not any(p.name in ("o.png", "run", "p.safetensors", "again.onnx") for p in tmp_path.iterdir())


def test_onnx_without_our_metadata_or_with_external_data_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    foreign = onnx.load(str(exported["onnx"]))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    external = onnx.load(str(exported["onnx"]))
    onnx.save(external, str(tmp_path / "external.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.data", size_threshold=0)
    for name, message in (("foreign.onnx", "no quantsr metadata"), ("external.onnx", "external tensor data")):
        res = run_cli("upscale", str(EXAMPLE), "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / name))
        assert res.returncode == 1 and message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert not (tmp_path / "o.png").exists()

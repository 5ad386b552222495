"""The rows of ``bench/cpu_peers.py``: each a callable ``(1,3,h,w) float32 -> (1,3,4h,4w)`` plus its size.

Artifacts (FP32 ONNX/IR, ORT and NNCF PTQ models) are built once into ``artifacts`` (per code version).
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantsr_cli.backends import use_backend
from quantsr_cli.backends.export_onnx import atomic_write_bytes, trace_onnx
from quantsr_cli.backends.export_openvino import compile_model, save_ir
from quantsr_cli.backends.runtime_common import cache_dir, model_hash
from quantsr_cli.data.imresize import imresize
from quantsr_cli.data.io import read_image
from quantsr_cli.engine.modelio import bundled_model_path, load_model

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Rows:
    fn: dict[str, Fn] = field(default_factory=dict)
    what: dict[str, str] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    keepalive: list[Any] = field(default_factory=list)

    def add(self, name: str, fn: Fn, what: str, size: int) -> None:
        self.fn[name], self.what[name], self.size[name] = fn, what, size

    def names(self) -> list[str]:
        return list(self.fn)

    def keep(self, names: list[str]) -> None:
        for name in [n for n in self.fn if n not in names]:
            del self.fn[name], self.what[name], self.size[name]


def calibration_images(data: str, count: int = 32, crop: int = 48, seed: int = 0) -> list[np.ndarray]:
    """``count`` LR crops (1,3,crop,crop) from T91 + BSD200 (MATLAB-bicubic x1/4 of the HR images)."""
    files = sorted(glob.glob(f"{data}/train/T91/*.png")) + sorted(glob.glob(f"{data}/train/BSD200/*.png"))
    rng = np.random.default_rng(seed)
    out = []
    for path in rng.choice(files, size=min(count, len(files)), replace=False):
        hr = read_image(path).rgb
        lr = imresize(hr, 0.25).clamp(0, 1)
        h, w = lr.shape[-2:]
        top, left = int(rng.integers(0, max(1, h - crop))), int(rng.integers(0, max(1, w - crop)))
        out.append(np.ascontiguousarray(lr[..., top:top + crop, left:left + crop].numpy(), dtype=np.float32))
    return out


def _ort_fn(path: Path, threads: int) -> Fn:
    from quantsr_cli.backends.onnxruntime_backend import runner

    run = runner(path, threads)
    return lambda x: torch.from_numpy(run(x.contiguous().numpy()))


def _ov_fn(source: Path | Any, threads: int, precision: str | None, rows: Rows) -> Fn:
    """``source`` (an IR path or an ``openvino.Model``) compiled for the CPU at ``precision`` (None: OpenVINO's own)."""
    import openvino as ov

    model = ov.Core().read_model(str(source)) if isinstance(source, (str, Path)) else source
    if precision is None:  # OpenVINO's own default: drop the f32 runtime option our IR files carry
        net = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    else:
        net = compile_model(model, threads, {"INFERENCE_PRECISION_HINT": precision})
    request = net.create_infer_request()
    rows.keepalive.append((net, request))
    return lambda x: torch.from_numpy(np.array(request.infer({0: x.contiguous().numpy()})[0], copy=True))


def _ir_bytes(path: Path) -> int:
    return path.stat().st_size + path.with_suffix(".bin").stat().st_size


def _fp_artifacts(fp: torch.nn.Module, artifacts: Path, data: str) -> dict[str, Path]:
    paths = {"onnx": artifacts / "imdn_fp32.onnx", "ir": artifacts / "imdn_fp32.xml",
             "ort_ptq": artifacts / "imdn_ort_int8.onnx", "nncf": artifacts / "imdn_ov_int8_nncf.xml"}
    if not paths["onnx"].is_file():  # the FP32 graph as torch.onnx traces it (no quantsr graph passes)
        atomic_write_bytes(paths["onnx"], trace_onnx(fp, passes=False).SerializeToString())
    if not paths["ir"].is_file():  # OpenVINO's own conversion of that ONNX file
        import openvino as ov

        save_ir(ov.convert_model(str(paths["onnx"])), paths["ir"])
    calib = None
    if not paths["ort_ptq"].is_file():
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        calib = calib or calibration_images(data)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter([{"lr": c} for c in calib])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        tmp = paths["ort_ptq"].with_suffix(".tmp.onnx")
        quantize_static(str(paths["onnx"]), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        tmp.replace(paths["ort_ptq"])
    if not paths["nncf"].is_file():
        import nncf
        import openvino as ov

        calib = calib or calibration_images(data)
        quantized = nncf.quantize(ov.Core().read_model(str(paths["ir"])), nncf.Dataset(calib))
        save_ir(quantized, paths["nncf"])
    return paths


def build_rows(models: list[str], fp_weights: str, artifacts: Path, threads: int, data: str) -> Rows:
    """All rows for ``threads`` threads (torch's thread count must already be set)."""
    rows = Rows()
    fp = load_model(fp_weights).model.eval()
    fp_cl = copy.deepcopy(fp).to(memory_format=torch.channels_last)
    pth = Path(fp_weights).stat().st_size
    rows.add("torch_fp32", lambda x: fp(x), "published FP32 IMDN x4, torch NCHW", pth)
    rows.add("torch_fp32_cl", lambda x: fp_cl(x.contiguous(memory_format=torch.channels_last)),
             "published FP32 IMDN x4, torch channels-last", pth)
    paths = _fp_artifacts(fp, artifacts, data)
    rows.add("ov_fp32", _ov_fn(paths["ir"], threads, "f32", rows), "FP32 model, OpenVINO f32", _ir_bytes(paths["ir"]))
    rows.add("ov_bf16", _ov_fn(paths["ir"], threads, "bf16", rows), "FP32 model, OpenVINO bf16 (its CPU default)",
             _ir_bytes(paths["ir"]))
    rows.add("ort_int8_ptq", _ort_fn(paths["ort_ptq"], threads), "ONNX Runtime static PTQ (QDQ, U8S8, per-channel)",
             paths["ort_ptq"].stat().st_size)
    rows.add("ov_int8_nncf", _ov_fn(paths["nncf"], threads, None, rows),
             "OpenVINO int8 PTQ (NNCF defaults; OpenVINO's default precision for the rest: bf16 here)",
             _ir_bytes(paths["nncf"]))
    for name in models:
        packed = load_model(name).model.eval()
        size = bundled_model_path(name).stat().st_size if bundled_model_path(name) else 0
        for backend, suffix in (("cpu", "cpu"), ("onnxruntime", "ort"), ("openvino", "ov")):
            model = use_backend(copy.deepcopy(packed), backend)
            rows.keepalive.append(model)
            flavor = "onnx" if backend == "onnxruntime" else "openvino"
            ext = {"onnx": ".onnx", "openvino": ".xml"}[flavor]
            file = cache_dir() / f"{model_hash(packed, flavor)}{ext}" if backend != "cpu" else None
            nbytes = size if file is None else file.stat().st_size if ext == ".onnx" else _ir_bytes(file)
            rows.add(f"{name}_{suffix}", model, f"quantsr {name}, {backend} backend", nbytes)
            if backend == "openvino":  # the same IR with bf16 float glue: faster, not exact (for the record)
                rows.add(f"{name}_ov_bf16", _ov_fn(file, threads, "bf16", rows),
                         f"quantsr {name}, its OpenVINO IR with bf16 float layers (not exact)", nbytes)
    return rows

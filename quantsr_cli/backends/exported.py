"""Run a file ``quantsr export`` wrote (``.onnx`` in ONNX Runtime, ``.xml`` + ``.bin`` in OpenVINO) as a model.

So that ``quantsr eval --model d.xml`` / ``upscale --model d.onnx`` check and use the deployed file itself.
:func:`load_exported` returns an :class:`ExportedModel` (an ``nn.Module`` without parameters whose
forward runs the file's runtime on the CPU, f32) and the file's ``quantsr.*`` metadata (arch, scale,
input multiple, method and bits). Files without that metadata (another tool's graphs, whose compute and
memory quantsr cannot vouch for) are refused, as are ONNX files whose tensors live in external files (a
model must not make quantsr read other paths). The runtimes are imported inside functions only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantsr_cli.backends.runtime_common import _padded
from quantsr_cli.errors import CheckpointError, ConfigError

RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino"}
"""Suffix of an exported file -> the backend (runtime) that runs it."""

_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}


class ExportedModel(nn.Module):
    """An exported file as a model: (N,3,H,W) float32 in [0,1] on the CPU -> (N,3,sH,sW), unclamped."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], runtime: str, meta: dict[str, Any]) -> None:
        super().__init__()
        self._run, self.runtime, self.arch = run, runtime, str(meta.get("arch") or "exported")
        self.multiple = max(1, int(meta.get("input_multiple") or 1))
        self.hparams: dict[str, Any] = {"upscale": int(meta.get("scale") or 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ConfigError(f"an exported model runs on the CPU in {self.runtime}, not on {x.device}")
        h, w = x.shape[-2:]
        s = self.hparams["upscale"]
        y = torch.from_numpy(np.array(self._run(_padded(x.float(), self.multiple).contiguous().numpy()), copy=True))
        return y[..., : h * s, : w * s].contiguous()


def _require(runtime: str, path: Path) -> None:
    from quantsr_cli.backends.export_onnx import EXTRA

    missing = [m for m in _PACKAGES[runtime] if importlib.util.find_spec(m) is None]
    if missing:
        raise CheckpointError(f"running this file needs {', '.join(missing)} ({EXTRA})", path)


def _checked(raw: dict[str, str], path: Path) -> dict[str, str]:
    """``raw`` when it is quantsr's export metadata (before anything is compiled), else CheckpointError."""
    scale, multiple = raw.get("scale", ""), raw.get("input_multiple", "1")
    if not (scale.isdigit() and 1 <= int(scale) <= 16 and multiple.isdigit() and 1 <= int(multiple) <= 64):
        raise CheckpointError("no quantsr metadata (scale): not written by `quantsr export`; quantsr runs the "
                              "files it exported itself", path)
    return raw


def _onnx(path: Path, threads: int | None) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, str]]:
    import onnx

    from quantsr_cli.backends.onnxruntime_backend import session

    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CheckpointError("ONNX model with external tensor data; quantsr runs self-contained files only", path)
    meta = _checked({e.key.removeprefix("quantsr."): e.value for e in proto.metadata_props
                     if e.key.startswith("quantsr.")}, path)
    del proto
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return (lambda x: sess.run(None, {name: x})[0]), meta


def _openvino(path: Path, threads: int | None) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, str]]:
    import openvino as ov

    from quantsr_cli.backends.export_openvino import compile_model

    if not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"OpenVINO IR without its weights file {path.with_suffix('.bin').name}", path)
    model = ov.Core().read_model(str(path))
    meta = _checked({key: model.get_rt_info(["quantsr", key]).astype(str)
                     for key in ("arch", "scale", "input_multiple", "method", "w_bits", "a_bits")
                     if model.has_rt_info(["quantsr", key])}, path)
    request = compile_model(model, int(threads or torch.get_num_threads())).create_infer_request()
    return (lambda x: request.infer({0: x})[0]), meta


def load_exported(path: Path, threads: int | None = None) -> tuple[ExportedModel, dict[str, Any]]:
    """The exported file at ``path`` (``.onnx`` or ``.xml``) ready to run, and its metadata.

    Raises:
        CheckpointError: missing runtime package, external data, missing ``.bin``, or a file the
            runtime cannot read, or a file without the metadata `quantsr export` writes.
    """
    runtime = RUNTIMES[path.suffix.lower()]
    _require(runtime, path)
    run, raw = (_onnx if runtime == "onnxruntime" else _openvino)(path, threads)
    meta: dict[str, Any] = {"kind": "exported", "runtime": runtime, "arch": raw.get("arch") or "exported",
                            "input_multiple": int(raw.get("input_multiple") or 1)}
    for key in ("w_bits", "a_bits"):
        if raw.get(key, "").isdigit():
            meta[key] = int(raw[key])
    if raw.get("method"):
        meta["method"] = raw["method"]
    meta["scale"] = int(raw["scale"])
    return ExportedModel(run, runtime, meta), meta

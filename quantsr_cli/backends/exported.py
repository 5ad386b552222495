"""Run a file ``quantsr export`` wrote (``.onnx`` in ONNX Runtime, ``.xml`` + ``.bin`` in OpenVINO) as a model.

So that ``quantsr eval --model d.xml`` / ``upscale --model d.onnx`` check and use the deployed file itself.
:func:`load_exported` returns an :class:`ExportedModel` (an ``nn.Module`` without parameters whose
forward runs the file's runtime on the CPU, f32) and the file's ``quantsr.*`` metadata (arch, scale,
input multiple, method and bits). Files without that metadata (another tool's graphs, whose compute and
memory quantsr cannot vouch for) are refused, as are ONNX files whose tensors live in external files (a
model must not make quantsr read other paths). The runtimes are imported inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.backends import runtime_common as rc
from quantsr_cli.errors import CheckpointError, ConfigError

RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino"}
"""Suffix of an exported file -> the backend (runtime) that runs it."""

_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
_KEYS = ("arch", "scale", "input_multiple", "method", "w_bits", "a_bits")


class ExportedModel(nn.Module):
    """An exported file as a model: (N,3,H,W) float32 in [0,1] on the CPU -> (N,3,sH,sW), unclamped."""

    def __init__(self, run: rc.Runner, runtime: str, meta: dict[str, Any]) -> None:
        super().__init__()
        self._run, self.runtime, self.arch = run, runtime, str(meta["arch"])
        self.multiple = int(meta["input_multiple"])
        self.hparams: dict[str, Any] = {"upscale": int(meta["scale"])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ConfigError(f"an exported model runs on the CPU in {self.runtime}, not on {x.device}")
        return rc.padded_call(self._run, x.float(), self.multiple, self.hparams["upscale"])


def _checked(raw: dict[str, str], path: Path) -> dict[str, str]:
    """``raw`` when it is quantsr's export metadata (before anything is compiled), else CheckpointError."""
    scale, multiple = raw.get("scale", ""), raw.get("input_multiple", "1")
    if not (scale.isdigit() and 1 <= int(scale) <= 16 and multiple.isdigit() and 1 <= int(multiple) <= 64):
        raise CheckpointError("no quantsr metadata (scale): not written by `quantsr export`; quantsr runs the "
                              "files it exported itself", path)
    return raw


def _onnx(path: Path, threads: int | None) -> tuple[rc.Runner, dict[str, str]]:
    import onnx

    from quantsr_cli.backends.onnxruntime_backend import runner

    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CheckpointError("ONNX model with external tensor data; quantsr runs self-contained files only", path)
    meta = _checked({e.key.removeprefix("quantsr."): e.value for e in proto.metadata_props
                     if e.key.startswith("quantsr.")}, path)
    del proto
    return runner(path, threads), meta


def _openvino(path: Path, threads: int | None) -> tuple[rc.Runner, dict[str, str]]:
    from quantsr_cli.backends.openvino_backend import read, runner

    if not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"OpenVINO IR without its weights file {path.with_suffix('.bin').name}", path)
    model = read(path)
    meta = _checked({key: model.get_rt_info(["quantsr", key]).astype(str) for key in _KEYS
                     if model.has_rt_info(["quantsr", key])}, path)
    return runner(model, threads), meta


def load_exported(path: Path, threads: int | None = None) -> tuple[ExportedModel, dict[str, Any]]:
    """The exported file at ``path`` (``.onnx`` or ``.xml``) ready to run, and its metadata.

    Raises:
        CheckpointError: missing runtime package, external data, missing ``.bin``, or a file the
            runtime cannot read, or a file without the metadata `quantsr export` writes.
    """
    runtime = RUNTIMES[path.suffix.lower()]
    problem = rc.missing_reason(_PACKAGES[runtime])
    if problem:
        raise CheckpointError(f"cannot run this file: {problem}", path)
    run, raw = (_onnx if runtime == "onnxruntime" else _openvino)(path, threads)
    meta: dict[str, Any] = {"kind": "exported", "runtime": runtime, "arch": raw.get("arch") or "exported",
                            "input_multiple": int(raw.get("input_multiple") or 1), "scale": int(raw["scale"])}
    meta.update({key: int(raw[key]) for key in ("w_bits", "a_bits") if raw.get(key, "").isdigit()})
    if raw.get("method"):
        meta["method"] = raw["method"]
    return ExportedModel(run, runtime, meta), meta

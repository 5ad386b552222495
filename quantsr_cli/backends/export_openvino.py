"""``quantsr export … -o FILE.xml``: OpenVINO IR (``FILE.xml`` + ``FILE.bin``) whose CPU plugin runs
our quantized convolutions in u8 x i8.

The model is traced to ONNX in the ``openvino`` flavor (:mod:`export_graph`): each activation
quantizer is one ``FakeQuantize`` (``org.openvinotoolkit`` domain, which OpenVINO's ONNX reader maps to
its own op) whose per-channel input range carries our shift and whose 16 or 256 levels keep our step;
2-bit code ranges are clamped first (Maximum/Minimum) and stay on a 16-level grid of the same step, since
the CPU plugin runs a convolution in u8 only after 16- or 256-level FakeQuantize. Weights are int8
constants ``u - zero`` dequantized by a per-tensor or per-channel scale (exact, zero-point free), which
the plugin keeps as i8. OpenVINO's converter (``ov.convert_model``) then builds the IR, and
:mod:`openvino_passes` rewrites it so that concatenations run in u8 and the channel attention reads its
input fewer times.

The IR records ``INFERENCE_PRECISION_HINT=f32`` in its runtime options: on CPUs with bf16 OpenVINO
would otherwise run the float layers (and the float glue between the quantizers) in bf16, which
moves the activation codes. ``openvino`` is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from quantsr_cli.backends.export_onnx import require, trace_onnx
from quantsr_cli.backends.openvino_passes import one_pass_variance, quantize_before_concat, quantize_concat_inputs

RUNTIME_OPTIONS = {"INFERENCE_PRECISION_HINT": "f32"}
"""Stored in the IR's ``runtime_options``; OpenVINO applies them when the model is compiled."""


def convert(model: nn.Module, passes: bool = True) -> Any:
    """The ``openvino.Model`` of ``model`` (packed, QAT or float); dynamic N/H/W like the ONNX export.

    ``passes``: apply :mod:`openvino_passes`' graph rewrites (same math up to float rounding, fewer f32
    memory passes); off only to measure what they save.
    """
    require("onnx", "onnxscript", "openvino")
    import openvino as ov

    proto = trace_onnx(model, flavor="openvino")
    with tempfile.TemporaryDirectory(prefix="quantsr-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        ov_model = ov.convert_model(str(path))
    if passes:
        one_pass_variance(ov_model)
        quantize_before_concat(ov_model)
        quantize_concat_inputs(ov_model)
    for key, value in RUNTIME_OPTIONS.items():
        ov_model.set_rt_info(value, ["runtime_options", key])
    for entry in proto.metadata_props:
        ov_model.set_rt_info(entry.value, ["quantsr", entry.key.removeprefix("quantsr.")])
    return ov_model


def save_ir(ov_model: Any, path: str | Path) -> int:
    """Write ``path`` (``.xml``) and its ``.bin`` atomically (bin first, then xml); returns total bytes."""
    import openvino as ov

    path = Path(path)
    xml, binary = path, path.with_suffix(".bin")
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as tmp:
        tmp_xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        size = tmp_xml.stat().st_size + tmp_xml.with_suffix(".bin").stat().st_size
        os.replace(tmp_xml.with_suffix(".bin"), binary)
        os.replace(tmp_xml, xml)
    return size


def export_openvino(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write ``model`` as OpenVINO IR to ``path`` (``.xml`` + ``.bin``); returns a small summary."""
    ov_model = convert(model)
    size = save_ir(ov_model, path)
    ops: dict[str, int] = {}
    for op in ov_model.get_ordered_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    return {"format": "openvino", "bytes": size, "fake_quantize": ops.get("FakeQuantize", 0),
            "convolution": ops.get("Convolution", 0), "nodes": sum(ops.values())}


def compile_model(ov_model: Any, threads: int = 0, extra: dict[str, Any] | None = None) -> Any:
    """Compile for the CPU plugin (``threads`` 0 = OpenVINO's default), f32 inference precision."""
    import openvino as ov

    config: dict[str, Any] = dict(RUNTIME_OPTIONS)
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    config.update(extra or {})
    with contextlib.redirect_stdout(None):
        return ov.Core().compile_model(ov_model, "CPU", config)


def runtime_precisions(compiled: Any) -> dict[str, str]:
    """Executed convolution name -> runtime precision (``u8``/``i8``/``f32``/``bf16``) of a compiled model."""
    out = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            out[op.get_friendly_name()] = info["runtimePrecision"].astype(str)
    return out

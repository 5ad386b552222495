"""``quantsr export … -o FILE.onnx``: an ONNX model with our exact quantizers as Q/DQ pairs.

The graph is traced with ``torch.onnx.export(dynamo=True)`` from :func:`export_graph.export_copy`
(see there for how each quantized layer is written), then post-processed here:

* :func:`onnx_passes.split_conv_outputs`: a convolution whose output is split along channels becomes one
  convolution per part (IMDN's distillation; no split copy at run time);
* the exporter's per-node debugging metadata (stack traces) is dropped and quantsr's own is added
  (``quantsr.arch``, ``quantsr.scale``, ``quantsr.input``, ``quantsr.input_multiple``);
* the input ``lr`` is ``(N, 3, H, W)`` float32 in ``[0, 1]`` with dynamic N, H and W; the output ``sr``
  is ``(N, 3, sH, sW)``, unclamped (as the torch model). Models that pad to a window multiple in Python
  (SwinIR) are traced on a multiple: H and W must then be multiples of ``quantsr.input_multiple``
  (metadata; the runtime backends pad and crop around the graph).

``onnx`` and ``onnxscript`` (what the exporter needs) are imported inside functions only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.backends.export_graph import export_copy
from quantsr_cli.backends.onnx_passes import split_conv_outputs
from quantsr_cli.backends.runtime_common import input_multiple
from quantsr_cli.errors import BackendUnavailableError, ConfigError

OPSET = 21
"""QuantizeLinear/DequantizeLinear as of opset 21 (per-axis scales, blocked layouts)."""

INPUT, OUTPUT = "lr", "sr"
EXTRA = "pip install 'quantsr[cpu-fast]'"
"""How a user gets the export and runtime dependencies (onnx, onnxscript, onnxruntime, openvino)."""


def require(*modules: str) -> None:
    """Raise BackendUnavailableError naming the extra when one of ``modules`` cannot be imported."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(f"{', '.join(missing)} not installed ({EXTRA})")


def trace_onnx(model: nn.Module, flavor: str = "onnx", example_hw: tuple[int, int] = (24, 24),
               passes: bool = True) -> Any:
    """The ``onnx.ModelProto`` of ``model`` (packed, QAT or float) with dynamic N/H/W, post-processed
    (``passes=False``: without :mod:`onnx_passes`, the graph as torch traced it).

    ``flavor="openvino"`` writes activations as ``org.openvinotoolkit::FakeQuantize`` (for OpenVINO's
    converter only; see :mod:`quantsr_cli.backends.export_openvino`).
    """
    require("onnx", "onnxscript")
    graph = export_copy(model, flavor)
    multiple = input_multiple(model)
    x = torch.rand(1, 3, *(-(-side // multiple) * multiple for side in example_hw))
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            program = torch.onnx.export(graph, (x,), input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                                        opset_version=OPSET, dynamic_shapes={"x": dims}, verbose=False,
                                        external_data=False)
    except Exception as exc:  # the exporter raises many kinds; one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"cannot trace the model for ONNX export ({type(exc).__name__}: {first})") from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    proto = program.model_proto
    if passes:
        split_conv_outputs(proto)
    _clean_metadata(proto, model)
    return proto


def _clean_metadata(proto: Any, model: nn.Module) -> None:
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info, *proto.graph.initializer):
        del value.metadata_props[:]
    del proto.metadata_props[:]
    hparams = getattr(model, "hparams", {}) or {}
    info = {"quantsr.arch": str(getattr(model, "arch", "")), "quantsr.scale": str(hparams.get("upscale", "")),
            "quantsr.input": "lr: (N, 3, H, W) float32 RGB in [0, 1]; sr: (N, 3, sH, sW), unclamped",
            "quantsr.input_multiple": str(input_multiple(model))}
    quant = getattr(model, "quant_config", None)
    if quant is not None and hasattr(quant, "w_bits"):  # the label `quantsr eval --model FILE.onnx` shows
        info.update({"quantsr.method": str(quant.method), "quantsr.w_bits": str(quant.w_bits),
                     "quantsr.a_bits": str(quant.a_bits)})
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "quantsr"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; exports are ordinary user files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def export_onnx(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Write ``model`` as ONNX to ``path`` (atomically); returns a small summary (ops, bytes)."""
    import onnx

    proto = trace_onnx(model)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(path, data)
    return summary(proto, len(data))


def summary(proto: Any, size: int) -> dict[str, Any]:
    """Counts of the quantization nodes and the file size."""
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"format": "onnx", "opset": OPSET, "bytes": size, "quantize_linear": ops.get("QuantizeLinear", 0),
            "dequantize_linear": ops.get("DequantizeLinear", 0), "conv": ops.get("Conv", 0), "nodes": sum(ops.values())}

"""The ``openvino`` backend: the whole model runs as its OpenVINO IR on OpenVINO's CPU plugin.

:func:`prepare_model` converts the model (:mod:`export_openvino`: one ``FakeQuantize`` per activation
quantizer with our exact step, shift and clamp on 16 or 256 levels, int8 weights), caches the IR by
content hash (:mod:`runtime_common`), compiles it with ``torch.get_num_threads()`` threads and f32
inference precision and replaces ``model.forward`` by an infer request; :func:`release_model` restores
the torch forward. The CPU plugin runs every quantized convolution in u8 x i8 (a test checks the
compiled model's runtime precisions). ``openvino`` is imported inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantsr_cli.backends import runtime_common as rc
from quantsr_cli.packing.modules import Impl, PackedModule, reference_forward

NAME = "openvino"


def unavailable_reason() -> str | None:
    """None when the packages are importable, else which are missing and the extra to install."""
    return rc.missing_reason(("openvino", "onnx", "onnxscript"))


def exported_file(model: nn.Module) -> Path:
    """The cached IR (``.xml``; its ``.bin`` beside it) of ``model``, converted now when not cached."""
    from quantsr_cli.backends.export_openvino import export_openvino

    path = rc.cache_dir() / f"{rc.model_hash(model, 'openvino')}.xml"
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        export_openvino(model, path)
    return path


def runner(ov_model: Any, threads: int | None = None) -> rc.Runner:
    """One call of ``ov_model`` (an ``openvino.Model``) compiled for the CPU (f32 inference precision,
    ``threads`` threads, default ``torch.get_num_threads()``)."""
    from quantsr_cli.backends.export_openvino import compile_model

    net = compile_model(ov_model, int(threads or torch.get_num_threads()))
    request = net.create_infer_request()

    def run(x: np.ndarray, _net: Any = net) -> np.ndarray:  # _net: the compiled model lives as long as `run`
        return np.array(request.infer({0: x}, share_inputs=True)[0], copy=True)  # the request owns its output

    return run


def read(path: str | Path) -> Any:
    """The ``openvino.Model`` of the IR at ``path``."""
    import openvino as ov

    return ov.Core().read_model(str(path))


def prepare_model(model: nn.Module) -> None:
    """Convert (or reuse the cached IR), compile it and route ``model(x)`` through an infer request."""
    rc.attach_runtime(model, NAME, lambda: runner(read(exported_file(model))))


def release_model(model: nn.Module) -> None:
    """Drop the compiled model and restore the torch forward."""
    rc.remove_forward(model)


def prepare(module: PackedModule) -> Impl:
    """The layer runs inside the compiled model; its own ``impl`` stays the reference."""
    module.backend_note = f"{NAME}: whole model"
    return reference_forward

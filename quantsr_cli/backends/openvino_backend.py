"""The ``openvino`` backend: the whole model runs as its OpenVINO IR on OpenVINO's CPU plugin.

:func:`prepare_model` converts the model (:mod:`export_openvino`: one ``FakeQuantize`` per activation
quantizer with our exact step, shift and clamp on 16 or 256 levels, int8 weights), caches the IR by
content hash (:mod:`runtime_common`), compiles it with ``torch.get_num_threads()`` threads and f32
inference precision and replaces ``model.forward`` by an infer request; :func:`release_model` restores
the torch forward. The CPU plugin runs every quantized convolution in u8 x i8 (a test checks the
compiled model's runtime precisions). ``openvino`` is imported inside functions only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantsr_cli.backends import runtime_common as rc
from quantsr_cli.errors import QuantSRError
from quantsr_cli.packing.modules import Impl, PackedModule, reference_forward

NAME = "openvino"
_STATE = "_quantsr_ov"


def unavailable_reason() -> str | None:
    """None when the packages are importable, else which are missing and the extra to install."""
    from quantsr_cli.backends.export_onnx import EXTRA

    missing = [m for m in ("openvino", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed ({EXTRA})" if missing else None


def exported_file(model: nn.Module) -> Path:
    """The cached IR (``.xml``; its ``.bin`` beside it) of ``model``, converted now when not cached."""
    from quantsr_cli.backends.export_openvino import export_openvino

    path = rc.cache_dir() / f"{rc.model_hash(model, 'openvino')}.xml"
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        export_openvino(model, path)
    return path


def compiled(path: str | Path, threads: int | None = None) -> Any:
    """The IR at ``path`` compiled for the CPU (f32 inference precision, ``threads`` threads)."""
    import openvino as ov

    from quantsr_cli.backends.export_openvino import compile_model

    return compile_model(ov.Core().read_model(str(path)), int(threads or torch.get_num_threads()))


def prepare_model(model: nn.Module) -> None:
    """Convert (or reuse the cached IR), compile it and route ``model(x)`` through an infer request."""
    release_model(model)
    rc.check_cpu_model(model, NAME)
    try:
        net = compiled(exported_file(model))
    except QuantSRError:
        raise
    except Exception as exc:  # a converter/plugin failure: one line (and auto falls back to cpu)
        raise rc.runtime_error(NAME, exc) from exc
    request = net.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        out = request.infer({0: x.numpy()}, share_inputs=True)
        return torch.from_numpy(np.array(out[0], copy=True))

    rc.install_forward(model, run)
    object.__setattr__(model, _STATE, (net, request))


def release_model(model: nn.Module) -> None:
    """Drop the compiled model and restore the torch forward."""
    rc.remove_forward(model)
    model.__dict__.pop(_STATE, None)


def prepare(module: PackedModule) -> Impl:
    """The layer runs inside the compiled model; its own ``impl`` stays the reference."""
    module.backend_note = f"{NAME}: whole model"
    return reference_forward

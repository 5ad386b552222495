"""The ``onnxruntime`` backend: the whole model runs as its ONNX export in ONNX Runtime (CPU).

:func:`prepare_model` exports the model (:mod:`export_onnx`: QuantizeLinear/DequantizeLinear pairs with
our exact steps, clamps and weight codes), caches the file by content hash (:mod:`runtime_common`),
opens an ``InferenceSession`` with ``torch.get_num_threads()`` intra-op threads and replaces
``model.forward`` by it; :func:`release_model` restores the torch forward. Per packed layer,
:func:`prepare` only records that the layer runs inside the session.

Exactness: ONNX rounds half to even like ``torch.round``; the outputs equal the ``torch`` backend's up
to float32 summation order (rare code flips, as for ``cpu``). Speed: ONNX Runtime 1.32's CPU provider
fuses a Q/DQ convolution into its int8 ``QLinearConv`` only when the convolution's output is
requantized too; our layers' outputs are float (the float glue needs them exact), so it runs float
convolutions on the exactly fake-quantized inputs. ``onnxruntime`` is imported inside functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.backends import runtime_common as rc
from quantsr_cli.packing.modules import Impl, PackedModule, reference_forward

NAME = "onnxruntime"


def unavailable_reason() -> str | None:
    """None when the packages are importable, else which are missing and the extra to install."""
    return rc.missing_reason(("onnxruntime", "onnx", "onnxscript"))


def exported_file(model: nn.Module) -> Path:
    """The cached ONNX export of ``model`` (exported now when not cached)."""
    from quantsr_cli.backends.export_onnx import export_onnx

    path = rc.cache_dir() / f"{rc.model_hash(model, 'onnx')}.onnx"
    if not path.is_file():
        export_onnx(model, path)
    return path


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``path`` (all graph optimizations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(path: str | Path, threads: int | None = None) -> rc.Runner:
    """One call of the ONNX file at ``path`` in a CPU session (see :func:`session`)."""
    sess = session(path, threads)
    name_in, name_out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    return lambda x: sess.run([name_out], {name_in: x})[0]


def prepare_model(model: nn.Module) -> None:
    """Export (or reuse the cached export), open a session and route ``model(x)`` through it."""
    rc.attach_runtime(model, NAME, lambda: runner(exported_file(model)))


def release_model(model: nn.Module) -> None:
    """Drop the session and restore the torch forward."""
    rc.remove_forward(model)


def prepare(module: PackedModule) -> Impl:
    """The layer runs inside the session; its own ``impl`` stays the reference (used off-CPU / with grad)."""
    module.backend_note = f"{NAME}: whole model"
    return reference_forward

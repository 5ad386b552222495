"""What the whole-model runtime backends (``onnxruntime``, ``openvino``) share.

* :func:`model_hash` -- a content hash of a model (class, hyper-parameters, every parameter and buffer,
  the packed layers' Python attributes) plus :data:`EXPORT_VERSION`, so a cached export is reused only
  for the same model exported by the same exporter.
* :func:`cache_dir` -- ``$QUANTSR_CACHE`` or ``$XDG_CACHE_HOME/quantsr`` (``~/.cache/quantsr``) +
  ``/export``; a temp folder when that cannot be created. Nothing is ever written next to user files.
* :func:`attach_runtime` / :func:`remove_forward` -- replace ``model.forward`` by a runtime call (an
  instance attribute, so ``model(x)`` uses it; runtime failures become one line) and undo that;
  :func:`padded_call` -- one call of a runtime on an image batch, padded to the graph's input multiple.
* :func:`missing_reason` -- which runtime packages are not installed, and the extra that installs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantsr_cli.errors import BackendUnavailableError, QuantSRError
from quantsr_cli.packing.modules import PackedModule

EXPORT_VERSION = "4"
"""Bump when the exported graph changes, so caches of the previous exporter are not reused."""

_FORWARD_ATTR = "_quantsr_runtime_forward"

Runner = Callable[[np.ndarray], np.ndarray]
"""One runtime call: float32 ``(N,3,H,W)`` array -> ``(N,3,sH,sW)`` array the caller may keep."""


def model_hash(model: nn.Module, flavor: str) -> str:
    """Hex sha256 of what determines the exported graph of ``model`` in ``flavor``."""
    digest = hashlib.sha256()
    head = {"version": EXPORT_VERSION, "flavor": flavor, "torch": torch.__version__.split("+")[0],
            "class": type(model).__qualname__, "arch": str(getattr(model, "arch", "")),
            "hparams": getattr(model, "hparams", {})}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, module in model.named_modules():
        extra = module.spec() if isinstance(module, PackedModule) else getattr(module, "skip", None)
        digest.update(f"{name}:{type(module).__qualname__}:{json.dumps(extra, sort_keys=True, default=str)}".encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:32]


def cache_dir() -> Path:
    """The export cache folder (created); a per-user temp folder when the cache cannot be created."""
    root = os.environ.get("QUANTSR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "quantsr")
    path = Path(root) / "export"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"quantsr-export-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def check_cpu_model(model: nn.Module, backend: str) -> None:
    """Raise BackendUnavailableError unless every parameter/buffer of ``model`` is on the CPU."""
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    if devices - {"cpu"}:
        raise BackendUnavailableError(f"backend {backend!r} runs on the CPU; the model is on {sorted(devices)[0]}"
                                      " (use --device cpu)")


def input_multiple(model: nn.Module) -> int:
    """H and W of an exported graph's input must be multiples of this (SwinIR: its window size).

    Models that pad to a window multiple branch on the input size in Python; the trace keeps only the
    branch of its example (a multiple), so the runtime backends pad before and crop after the graph.
    """
    return max(1, int(getattr(model, "window_size", 1) or 1))


def _padded(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` padded right/bottom to multiples of ``multiple`` like SwinIR (reflect, replicate if too small)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if not (pad_h or pad_w):
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def runtime_error(backend: str, exc: Exception) -> BackendUnavailableError:
    """A one-line BackendUnavailableError for a runtime's own failure on this model."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return BackendUnavailableError(f"backend {backend!r} cannot run this model ({type(exc).__name__}: {first})")


def missing_reason(packages: tuple[str, ...]) -> str | None:
    """None when every package is importable, else which are missing and the extra to install."""
    from quantsr_cli.backends.export_onnx import EXTRA

    missing = [m for m in packages if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed ({EXTRA})" if missing else None


def padded_call(run: Runner, x: torch.Tensor, multiple: int, scale: int) -> torch.Tensor:
    """``run`` on ``x`` (float32 ``(N,3,H,W)``, CPU) padded to multiples of ``multiple``, cropped to ``sH x sW``."""
    h, w = x.shape[-2:]
    y = torch.from_numpy(np.ascontiguousarray(run(_padded(x, multiple).contiguous().numpy())))
    return y if multiple == 1 else y[..., : h * scale, : w * scale].contiguous()


def attach_runtime(model: nn.Module, backend: str, open_runner: Callable[[], Runner]) -> None:
    """Make ``model(x)`` call the runner ``open_runner()`` returns (float32 input on the CPU, no gradient)
    until :func:`remove_forward`; the torch forward serves everything else. A failure of the runtime
    while opening becomes a one-line BackendUnavailableError (``auto`` then falls back)."""
    remove_forward(model)
    check_cpu_model(model, backend)
    try:
        run = open_runner()
    except QuantSRError:
        raise
    except Exception as exc:  # a converter/plugin failure on this model
        raise runtime_error(backend, exc) from exc
    multiple = input_multiple(model)
    scale = int((getattr(model, "hparams", {}) or {}).get("upscale", 1))

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
            return type(model).forward(model, x)  # gradients / other devices: the torch graph
        return padded_call(run, x, multiple, scale)

    object.__setattr__(model, "forward", forward)
    object.__setattr__(model, _FORWARD_ATTR, True)


def remove_forward(model: nn.Module) -> None:
    """Undo :func:`attach_runtime` (no-op when nothing is attached)."""
    if model.__dict__.pop(_FORWARD_ATTR, None):
        model.__dict__.pop("forward", None)

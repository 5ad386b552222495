"""The backend interface (:class:`Backend`) and the one table of backends (:data:`BACKENDS`).

A backend is a module implementing :class:`Backend`; it is registered by one :class:`BackendSpec` line
in :data:`BACKENDS`, which says where the module is (imported only when the backend is used or
checked), what it needs (packages, a CUDA device) and whether ``auto`` may pick it. Nothing else in
quantsr lists backend names.

Two kinds of backend fit the interface:

* **per-layer** (``torch``, ``cpu``): ``prepare(module)`` returns the ``impl(module, x)`` each packed
  layer's forward calls; ``prepare_model``/``release_model`` only add or remove model-wide helpers.
* **whole-model** (``cupy``'s GPU engine; an ONNX Runtime or OpenVINO backend would be one):
  ``prepare_model(model)`` replaces the model's forward (e.g. compiles or exports the network and installs
  a runner as an instance attribute ``model.forward``) and ``release_model(model)`` restores it;
  ``prepare(module)`` still returns a per-layer ``impl`` (the reference, ``packing.modules.reference_forward``,
  when the backend runs nothing per layer) for layers run outside the installed forward.

:func:`quantsr_cli.backends.use_backend` calls, in this order: the previous backend's
``release_model(model)``, then ``prepare_model(model)``, then ``prepare(module)`` for every packed module.
A whole-model backend that traces the model in ``prepare_model`` must therefore set the packed modules'
``impl`` to ``reference_forward`` itself before tracing (the previous backend's may still be set).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from quantsr_cli.packing.modules import Impl, PackedModule


@runtime_checkable
class Backend(Protocol):
    """What a backend module defines (module-level functions)."""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else why not in one line (called only after the spec's
        own checks of packages and device passed)."""

    def prepare(self, module: PackedModule) -> Impl:
        """Per packed module: cache what the layer needs and return its ``impl(module, x)``; set
        ``module.backend_note`` to how it runs (e.g. a per-layer fallback to the reference)."""

    def prepare_model(self, model: nn.Module) -> None:
        """Model-wide set-up before the layers are prepared (hooks, or a replacement forward)."""

    def release_model(self, model: nn.Module) -> None:
        """Undo :meth:`prepare_model` (called before another backend is set on the model)."""


@dataclass(frozen=True)
class BackendSpec:
    """One registered backend.

    Attributes:
        name: the ``--backend`` value.
        module: import path of the module implementing :class:`Backend`.
        summary: one line for help texts.
        requires: Python packages it needs, checked without importing them.
        install_hint: how to install ``requires`` (shown when one is missing).
        device: the torch device type the model must be on (``"cuda"``), or None for the model's own.
        auto_rank: ``auto`` picks the available backend with the lowest rank; None: never picked by ``auto``.
        half: whether it runs the float parts in float16 when the model's ``quantsr_engine_precision`` is
            ``"fp16"`` (``upscale --half``).
        any_model: a whole-model runtime that also runs float and fake-quant models (it exports the
            network); the others run packed models (float and fake-quant models stay on torch).
    """

    name: str
    module: str
    summary: str
    requires: tuple[str, ...] = ()
    install_hint: str = ""
    device: str | None = None
    auto_rank: int | None = None
    half: bool = False
    any_model: bool = False

    def load(self) -> Backend:
        """The implementation module (imported now); TypeError when it does not implement :class:`Backend`."""
        mod: ModuleType = importlib.import_module(self.module)
        if not isinstance(mod, Backend):
            missing = [f for f in ("unavailable_reason", "prepare", "prepare_model", "release_model")
                       if not callable(getattr(mod, f, None))]
            raise TypeError(f"backend module {self.module} does not define {', '.join(missing)}")
        return mod

    def unavailable_reason(self) -> str | None:
        """None when this backend can run here, else everything missing (device, packages, or the module's
        own reason) in one line."""
        problems = []
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("no CUDA device (torch.cuda.is_available() is False)")
        for package in self.requires:
            if not _installed(package):
                problems.append(f"the {package} package is not installed" + (f" ({self.install_hint})"
                                                                              if self.install_hint else ""))
        if problems:
            return "; ".join(problems)
        try:
            return self.load().unavailable_reason()
        except Exception as exc:  # noqa: BLE001 - a broken driver or package install can raise anything on import
            return f"the {self.name} backend cannot be loaded ({type(exc).__name__}: {str(exc)[:160]})"


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


AUTO = "auto"
"""The backend name that picks the preferred available backend (every command's default)."""

_CPU_FAST = "pip install 'quantsr[cpu-fast]'"

BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", "quantsr_cli.backends.torch_ref", "float reference: dequantized weights, torch conv/linear"),
    BackendSpec("cpu", "quantsr_cli.backends.cpu", "oneDNN int8 kernels on the codes (x86)", auto_rank=2),
    BackendSpec("cupy", "quantsr_cli.backends.cupy_backend", "CUDA kernels and the fused GPU engine",
                requires=("cupy",), install_hint="pip install 'quantsr[gpu]'", device="cuda", auto_rank=0, half=True),
    BackendSpec("openvino", "quantsr_cli.backends.openvino_backend",
                "OpenVINO CPU plugin on the exported IR (u8 convolutions)", requires=("openvino", "onnx", "onnxscript"),
                install_hint=_CPU_FAST, auto_rank=1, any_model=True),
    BackendSpec("onnxruntime", "quantsr_cli.backends.onnxruntime_backend", "ONNX Runtime on the exported Q/DQ graph",
                requires=("onnxruntime", "onnx", "onnxscript"), install_hint=_CPU_FAST, any_model=True),
)}
"""Registered backends by name, in the order help texts list them."""

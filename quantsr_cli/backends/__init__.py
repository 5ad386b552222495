"""Compute backends for packed models: ``torch`` (reference), ``cpu`` (oneDNN int8), ``cupy`` (CUDA),
and the whole-model runtimes ``onnxruntime`` / ``openvino`` (the model exported, run there).

A backend is a module exposing ``prepare(module) -> impl`` (called for every packed module; the
returned ``impl(module, x)`` becomes ``module.impl``) and optionally ``prepare_model(model)`` /
``release_model(model)`` for model-wide set-up and its undoing. ``cupy`` lives in
``quantsr_cli.backends.cupy_backend`` and is imported only when requested (it is the only cupy user);
it may define ``unavailable_reason() -> str | None`` to refine the availability check. The runtimes
(``onnxruntime_backend``, ``openvino_backend``) define it too and do their work in ``prepare_model``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch
from torch import nn

from quantsr_cli.errors import BackendUnavailableError, ConfigError, QuantSRError

__all__ = ["BACKENDS", "RUNTIMES", "AUTO_RUNTIMES", "available_backends", "resolve_backend", "use_backend", "backend_of"]

BACKENDS = ("torch", "cpu", "cupy", "onnxruntime", "openvino")
"""Backend names accepted by :func:`use_backend` (plus ``"auto"``)."""

RUNTIMES = ("openvino", "onnxruntime")
"""Whole-model runtime backends (the model exported and run there)."""

AUTO_RUNTIMES = ("openvino",)
"""What ``auto`` tries on a CPU before ``cpu``: onnxruntime runs our graphs with float convolutions
(its int8 ``QLinearConv`` needs requantized outputs) and is slower than ``cpu`` (bench/cpu_peers.py)."""

_FILES = {"torch": "torch_ref", "onnxruntime": "onnxruntime_backend", "openvino": "openvino_backend"}

_ATTR = "quantsr_backend"


def _cupy_problem() -> str | None:
    """None when the cupy backend can run here, else everything missing (CUDA, cupy) in one line.

    Does not import cupy itself: that is left to ``cupy_backend.unavailable_reason()``.
    """
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device (torch.cuda.is_available() is False)")
    try:
        has_cupy = importlib.util.find_spec("cupy") is not None
    except (ImportError, ValueError):
        has_cupy = False
    if not has_cupy:
        problems.append("the cupy package is not installed (pip install 'quantsr[gpu]')")
    if problems:
        return "; ".join(problems)
    try:
        backend = importlib.import_module("quantsr_cli.backends.cupy_backend")
        check = getattr(backend, "unavailable_reason", None)
        return check() if callable(check) else None
    except Exception as exc:  # a broken CUDA/cupy install can raise anything on import
        return f"the cupy backend cannot be loaded ({type(exc).__name__}: {str(exc)[:160]})"


def _runtime_problem(name: str) -> str | None:
    """None when runtime backend ``name`` can run here (its packages import), else what is missing."""
    return importlib.import_module(f"quantsr_cli.backends.{_FILES[name]}").unavailable_reason()


def _module(name: str) -> ModuleType:
    if name in RUNTIMES and (problem := _runtime_problem(name)) is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {problem}")
    if name == "cupy":
        problem = _cupy_problem()
        if problem is not None:
            raise BackendUnavailableError(f"backend 'cupy' cannot run here: {problem}")
        return importlib.import_module("quantsr_cli.backends.cupy_backend")
    return importlib.import_module(f"quantsr_cli.backends.{_FILES.get(name, name)}")


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ``["torch", "cpu"]`` (+ ``"cupy"`` with CUDA and cupy,
    + the installed runtimes)."""
    runtimes = [name for name in RUNTIMES if _runtime_problem(name) is None]
    return ["torch", "cpu"] + (["cupy"] if _cupy_problem() is None else []) + runtimes


def resolve_backend(name: str) -> str:
    """Map ``auto`` to ``cupy`` when CUDA and cupy are usable, else the first installed of
    :data:`AUTO_RUNTIMES`, else ``cpu``; check other names.

    Raises:
        ConfigError: an unknown name.
        BackendUnavailableError: ``cupy`` requested but CUDA or cupy is missing (names which), or a
            runtime whose packages are missing (names the extra).
    """
    if name == "auto":
        if _cupy_problem() is None:
            return "cupy"
        return next((r for r in AUTO_RUNTIMES if _runtime_problem(r) is None), "cpu")
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    if name == "cupy" or name in RUNTIMES:
        _module(name)
    return name


def backend_of(model: nn.Module) -> str:
    """The backend last set on ``model`` by :func:`use_backend` (``"torch"`` by default)."""
    return str(getattr(model, _ATTR, "torch"))


def use_backend(model: nn.Module, name: str = "auto") -> nn.Module:
    """Set ``impl`` on every packed module of ``model`` (in place) and prepare per-layer caches.

    Args:
        model: a model holding packed modules (others are left as they are).
        name: ``auto``, ``torch``, ``cpu``, ``cupy``, ``onnxruntime`` or ``openvino``. With ``auto``, a
            runtime that cannot take the model (e.g. its export fails) falls back to ``cpu``.

    Returns:
        ``model``. Each packed module gets ``backend_note`` saying how it runs (e.g. a per-layer
        fallback to the reference).
    """
    from quantsr_cli.packing.modules import PackedModule

    resolved = resolve_backend(name)
    previous = _module(backend_of(model)) if backend_of(model) != resolved else None
    if previous is not None and callable(getattr(previous, "release_model", None)):
        previous.release_model(model)
    backend = _module(resolved)
    try:
        if callable(getattr(backend, "prepare_model", None)):
            backend.prepare_model(model)
    except QuantSRError:
        if name != "auto" or resolved not in RUNTIMES:
            raise
        resolved, backend = "cpu", _module("cpu")
        backend.prepare_model(model)
    for module in model.modules():
        if isinstance(module, PackedModule):
            module.impl = backend.prepare(module)
    object.__setattr__(model, _ATTR, resolved)
    return model

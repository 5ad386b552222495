"""Compute backends for packed models: ``torch`` (reference), ``cpu`` (oneDNN int8), ``cupy`` (CUDA).

A backend is a module exposing ``prepare(module) -> impl`` (called for every packed module; the
returned ``impl(module, x)`` becomes ``module.impl``) and optionally ``prepare_model(model)`` /
``release_model(model)`` for model-wide set-up and its undoing. ``cupy`` lives in
``quantsr_cli.backends.cupy_backend`` and is imported only when requested (it is the only cupy user);
it may define ``unavailable_reason() -> str | None`` to refine the availability check.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from torch import nn

from quantsr_cli.errors import BackendUnavailableError, ConfigError

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "use_backend", "backend_of"]

BACKENDS = ("torch", "cpu", "cupy")
"""Backend names accepted by :func:`use_backend` (plus ``"auto"``)."""

_ATTR = "quantsr_backend"


def _cupy_problem() -> str | None:
    """None when the cupy backend can run here, else what is missing (no import of cupy if absent)."""
    if importlib.util.find_spec("cupy") is None:
        return "the cupy package is not installed (pip install 'quantsr[gpu]')"
    try:
        import cupy  # noqa: PLC0415 - lazy on purpose: only when cupy is requested

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:  # cupy raises CUDARuntimeError, ImportError, ... without a usable CUDA
        return f"CUDA is not usable ({type(exc).__name__}: {str(exc)[:120]})"
    try:
        backend = importlib.import_module("quantsr_cli.backends.cupy_backend")
    except ImportError as exc:
        return f"quantsr_cli.backends.cupy_backend cannot be imported ({exc})"
    check = getattr(backend, "unavailable_reason", None)
    return check() if callable(check) else None


def _module(name: str) -> ModuleType:
    if name == "cupy":
        problem = _cupy_problem()
        if problem is not None:
            raise BackendUnavailableError(f"backend 'cupy' cannot run here: {problem}")
        return importlib.import_module("quantsr_cli.backends.cupy_backend")
    return importlib.import_module(f"quantsr_cli.backends.{'torch_ref' if name == 'torch' else name}")


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ``["torch", "cpu"]`` (+ ``"cupy"`` with CUDA and cupy)."""
    return ["torch", "cpu"] + (["cupy"] if _cupy_problem() is None else [])


def resolve_backend(name: str) -> str:
    """Map ``auto`` to ``cupy`` when CUDA and cupy are usable, else ``cpu``; check other names.

    Raises:
        ConfigError: an unknown name.
        BackendUnavailableError: ``cupy`` requested but CUDA or cupy is missing (names which).
    """
    if name == "auto":
        return "cupy" if _cupy_problem() is None else "cpu"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    if name == "cupy":
        _module("cupy")
    return name


def backend_of(model: nn.Module) -> str:
    """The backend last set on ``model`` by :func:`use_backend` (``"torch"`` by default)."""
    return str(getattr(model, _ATTR, "torch"))


def use_backend(model: nn.Module, name: str = "auto") -> nn.Module:
    """Set ``impl`` on every packed module of ``model`` (in place) and prepare per-layer caches.

    Args:
        model: a model holding packed modules (others are left as they are).
        name: ``auto``, ``torch``, ``cpu`` or ``cupy``.

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
    if callable(getattr(backend, "prepare_model", None)):
        backend.prepare_model(model)
    for module in model.modules():
        if isinstance(module, PackedModule):
            module.impl = backend.prepare(module)
    object.__setattr__(model, _ATTR, resolved)
    return model

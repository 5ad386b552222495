"""Compute backends for packed models: ``torch`` (reference), ``cpu`` (oneDNN int8), ``cupy`` (CUDA).

The interface every backend implements (:class:`Backend`) and the table that registers them
(:data:`BACKENDS`, one :class:`BackendSpec` per backend) are in :mod:`quantsr_cli.backends.registry`.
``auto`` (every command's default) picks the available backend with the lowest ``auto_rank``: ``cupy``
when CUDA and cupy are usable, else ``openvino`` when the ``cpu-fast`` extra is installed, else ``cpu``;
a whole-model runtime that cannot take a model under ``auto`` (its export fails) gives way to the next.
Backend modules are imported only when used or checked; ``cupy_backend`` is the only cupy user, the
runtime backends (``openvino_backend``, ``onnxruntime_backend``) the only onnx/OpenVINO users.
"""

from __future__ import annotations

from torch import nn

from quantsr_cli.backends.registry import AUTO, BACKENDS, Backend, BackendSpec
from quantsr_cli.errors import BackendUnavailableError, ConfigError, QuantSRError
from quantsr_cli.packing.modules import PackedModule

__all__ = ["AUTO", "BACKENDS", "Backend", "BackendSpec", "auto_backend", "available_backends", "backend_choices",
           "backend_of", "resolve_backend", "use_backend"]

_ATTR = "quantsr_backend"
DEFAULT = "torch"
"""The backend of a packed model nobody has set one on (its modules start with the reference ``impl``)."""


def backend_choices() -> list[str]:
    """Every accepted ``--backend`` value: ``auto`` and the registered names."""
    return [AUTO, *BACKENDS]


def available_backends() -> list[str]:
    """Backends usable on this machine, e.g. ``["torch", "cpu"]`` (+ ``"cupy"`` with CUDA and cupy)."""
    return [name for name, spec in BACKENDS.items() if spec.unavailable_reason() is None]


def auto_backend(after: str | None = None) -> str:
    """The available backend with the lowest ``auto_rank`` (``torch`` when none is); ``after``: only those
    ranked below that one (the next choice when it could not take the model)."""
    ranked = sorted((s for s in BACKENDS.values() if s.auto_rank is not None), key=lambda s: s.auto_rank or 0)
    if after is not None and BACKENDS[after].auto_rank is not None:
        ranked = [s for s in ranked if (s.auto_rank or 0) > (BACKENDS[after].auto_rank or 0)]
    return next((s.name for s in ranked if s.unavailable_reason() is None), DEFAULT)


def resolve_backend(name: str) -> str:
    """Map ``auto`` to :func:`auto_backend`; check that any other name is registered and can run here.

    Raises:
        ConfigError: an unknown name.
        BackendUnavailableError: a registered backend that cannot run here (names what is missing).
    """
    if name == AUTO:
        return auto_backend()
    spec = BACKENDS.get(name)
    if spec is None:
        raise ConfigError(f"unknown backend {name!r}; choose {', '.join(backend_choices())}")
    problem = spec.unavailable_reason()
    if problem is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {problem}")
    return name


def backend_of(model: nn.Module) -> str:
    """The backend last set on ``model`` by :func:`use_backend` (``"torch"`` by default)."""
    return str(getattr(model, _ATTR, DEFAULT))


def use_backend(model: nn.Module, name: str = AUTO) -> nn.Module:
    """Set ``impl`` on every packed module of ``model`` (in place) and prepare per-layer caches.

    Order: the previous backend's ``release_model``, this one's ``prepare_model``, then ``prepare`` for
    each packed module (see :mod:`quantsr_cli.backends.registry`).

    Args:
        model: a model holding packed modules (others are left as they are).
        name: ``auto`` or a name in :data:`BACKENDS`.

    Returns:
        ``model``. Each packed module gets ``backend_note`` saying how it runs.
    """
    resolved = resolve_backend(name)
    previous = backend_of(model)
    if previous != resolved and previous in BACKENDS:
        BACKENDS[previous].load().release_model(model)
    backend = BACKENDS[resolved].load()
    while True:
        try:
            backend.prepare_model(model)
            break
        except QuantSRError:  # e.g. a runtime's export: under auto, the next backend takes the model
            if name != AUTO or not BACKENDS[resolved].any_model:
                raise
            resolved = auto_backend(after=resolved)
            backend = BACKENDS[resolved].load()
    for module in model.modules():
        if isinstance(module, PackedModule):
            module.impl = backend.prepare(module)
    object.__setattr__(model, _ATTR, resolved)
    return model

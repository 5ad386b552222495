"""Choose and attach a compute backend to a loaded model."""

from __future__ import annotations

from quantsr_cli.backends import RUNTIMES, backend_of, resolve_backend, use_backend
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.errors import ConfigError

BACKENDS = ("auto", "torch", "cpu", "cupy", *RUNTIMES)


def select_backend(loaded: LoadedModel, name: str, device: str) -> str:
    """Attach backend ``name`` to the packed layers of ``loaded``; returns the backend used.

    Float (``fp``) and fake-quant (``qat``) models run through torch unless a runtime
    (``onnxruntime``/``openvino``) is named; diffusion models always run through torch.
    """
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in RUNTIMES and loaded.kind.startswith("diffusion"):
        raise ConfigError(f"--backend {name}: diffusion models run through torch only")
    if name in RUNTIMES and loaded.kind != "packed":
        use_backend(loaded.model, name)
        return name
    if loaded.kind != "packed":
        if name == "cupy":
            resolve_backend("cupy")  # still report a missing GPU/cupy clearly
        return "torch"
    chosen = resolve_backend(name)
    if chosen == "cupy" and not str(device).startswith("cuda"):
        loaded.model.to("cuda")
    use_backend(loaded.model, chosen)
    return backend_of(loaded.model)  # auto may have fallen back from a runtime to cpu

"""Choose and attach a compute backend to a loaded model."""

from __future__ import annotations

from quantsr_cli.backends import resolve_backend, use_backend
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.errors import ConfigError

BACKENDS = ("auto", "torch", "cpu", "cupy")


def select_backend(loaded: LoadedModel, name: str, device: str) -> str:
    """Attach backend ``name`` to the packed layers of ``loaded``; returns the backend used.

    Float (``fp``) and fake-quant (``qat``) models always run through torch.
    """
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if loaded.kind != "packed":
        if name == "cupy":
            resolve_backend("cupy")  # still report a missing GPU/cupy clearly
        return "torch"
    chosen = resolve_backend(name)
    if chosen == "cupy" and not str(device).startswith("cuda"):
        loaded.model.to("cuda")
    use_backend(loaded.model, chosen)
    return chosen

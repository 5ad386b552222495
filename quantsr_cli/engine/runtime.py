"""Choose and attach a compute backend to a loaded model."""

from __future__ import annotations

from quantsr_cli.backends import resolve_backend, use_backend
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.errors import ConfigError

BACKENDS = ("auto", "torch", "cpu", "cupy")


def select_backend(loaded: LoadedModel, name: str, device: str, half: bool = False) -> str:
    """Attach backend ``name`` to the packed layers of ``loaded``; returns the backend used.

    Float (``fp``) and fake-quant (``qat``) models always run through torch. ``half``: the GPU engine's
    float16 precision (``cupy`` only; ConfigError elsewhere).
    """
    if name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if loaded.kind != "packed":
        if name == "cupy":
            resolve_backend("cupy")  # still report a missing GPU/cupy clearly
        if half:
            raise ConfigError("--half runs packed models on the GPU engine (--backend cupy); this model is not packed")
        return "torch"
    chosen = resolve_backend(name)
    if half and chosen != "cupy":
        raise ConfigError(f"--half runs on the GPU engine (--backend cupy); this run uses the {chosen} backend")
    object.__setattr__(loaded.model, "quantsr_engine_precision", "fp16" if half else None)
    if chosen == "cupy" and not str(device).startswith("cuda"):
        loaded.model.to("cuda")
    use_backend(loaded.model, chosen)
    return chosen

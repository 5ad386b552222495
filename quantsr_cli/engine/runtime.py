"""Choose and attach a compute backend to a loaded model."""

from __future__ import annotations

from quantsr_cli.backends import AUTO, BACKENDS, backend_choices, backend_of, resolve_backend, use_backend
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.errors import ConfigError

PRECISION_ATTR = "quantsr_engine_precision"
"""Model attribute a backend with float16 glue (``BackendSpec.half``) reads: ``"fp16"`` or None."""


def _half_backends() -> str:
    return ", ".join(f"--backend {n}" for n, s in BACKENDS.items() if s.half)


def select_backend(loaded: LoadedModel, name: str, device: str, half: bool = False) -> str:
    """Attach backend ``name`` (``auto`` or a registered name) to the packed layers of ``loaded``;
    returns the backend used. A backend that needs a device (``cupy``: CUDA) moves the model there.

    Float (``fp``) and fake-quant (``qat``) models run through torch unless a whole-model runtime
    (``BackendSpec.any_model``: openvino, onnxruntime) is named; a named backend is still checked, so that
    one that cannot run here is reported. Diffusion models always run through torch. ``half``: float16
    glue, for backends whose spec has ``half`` (the GPU engine); ConfigError elsewhere.
    """
    if name != AUTO and name not in BACKENDS:
        raise ConfigError(f"--backend {name!r}; choose one of {', '.join(backend_choices())}")
    spec_named = BACKENDS.get(name)
    if loaded.kind == "exported":  # the file runs in the runtime it was written for
        runtime = str(loaded.meta["runtime"])
        if name not in (AUTO, runtime) or half:
            raise ConfigError(f"{loaded.source} is an exported model and runs on --backend {runtime} only"
                              + (" (no --half)" if half else ""))
        return runtime
    if spec_named is not None and spec_named.any_model and loaded.kind.startswith("diffusion"):
        raise ConfigError(f"--backend {name}: diffusion models run through torch only")
    if loaded.kind != "packed":
        if spec_named is not None and spec_named.any_model and not half:
            use_backend(loaded.model, name)
            return name
        if name != AUTO:
            resolve_backend(name)
        if half:
            raise ConfigError(f"--half runs packed models on the GPU engine ({_half_backends()}); this model is not "
                              "packed")
        return "torch"
    chosen = resolve_backend(name)
    spec = BACKENDS[chosen]
    if half and not spec.half:
        raise ConfigError(f"--half runs on the GPU engine ({_half_backends()}); this run uses the {chosen} backend")
    object.__setattr__(loaded.model, PRECISION_ATTR, "fp16" if half else None)
    if spec.device is not None and not str(device).startswith(spec.device):
        loaded.model.to(spec.device)
    use_backend(loaded.model, chosen)
    return backend_of(loaded.model)  # under auto a runtime that cannot take the model gives way to the next

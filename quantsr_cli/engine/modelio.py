"""Load any model a user can name: a bundled name, our safetensors file, or a foreign ``.pth``.

``default`` (x4 W4A4) and ``default-w2`` (x4 W2A2) are packed models shipped inside the package.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.backends.exported import RUNTIMES as _EXPORTED_RUNTIMES
from quantsr_cli.config import QUANT_BITS
from quantsr_cli.errors import CheckpointError, QuantSRError
from quantsr_cli.models import ARCHS, arch_spec
from quantsr_cli.models.loading import model_from_state, read_state_dict
from quantsr_cli.packing import foreign as packing_foreign
from quantsr_cli.packing import io as packing_io

BUNDLED_MODELS: dict[str, str] = {
    "default": "default_x4_w4a4.safetensors",
    "default-w2": "default_x4_w2a2.safetensors",
}
"""Bundled model name -> file name inside ``quantsr_cli/weights``."""

SAFETENSORS_SUFFIXES = (".safetensors", ".st")


@dataclass
class LoadedModel:
    """A model ready for inference plus what is known about it.

    Attributes:
        model: the network in eval mode; maps (N,3,H,W) in [0,1] to (N,3,sH,sW).
        arch: registry name, e.g. ``"imdn"``.
        scale: upscaling factor.
        kind: ``"fp"`` (float weights), ``"qat"`` (fake-quant), ``"packed"`` (bit-packed codes) or
            ``"exported"`` (an ``.onnx``/``.xml`` file run by its runtime).
        source: what the user passed (path or bundled name).
        meta: the safetensors metadata (decoded JSON values), empty for ``.pth`` files.
        detected: for a foreign checkpoint, one line saying what it was detected as (else None).
    """

    model: nn.Module
    arch: str
    scale: int
    kind: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    detected: str | None = None

    @property
    def label(self) -> str:
        """Short human label: ``imdn x4 W4A4 rbd (packed)``."""
        bits = ""
        if self.kind not in ("fp", "diffusion-fp") and (self.kind != "exported" or "w_bits" in self.meta):
            src = self.meta.get("quant_spec") if isinstance(self.meta.get("quant_spec"), dict) else self.meta
            method = self.meta.get("method", "qartsr" if self.kind == "diffusion-qat" else "")
            bits = f" W{src.get('w_bits', '?')}A{src.get('a_bits', '?')} {method}"
        name = self.arch
        if isinstance(self.meta.get("hparams"), dict) and self.arch in ARCHS:
            name = ARCHS[self.arch].display(self.meta["hparams"])
        return f"{name} x{self.scale}{bits} ({self.kind})"


def bundled_model_path(name: str) -> Path | None:
    """Path of the bundled model ``name`` or None when it is not a bundled name."""
    file = BUNDLED_MODELS.get(name)
    if file is None:
        return None
    return Path(str(resources.files("quantsr_cli") / "weights" / file))


def resolve_model_path(source: str) -> Path:
    """Map a bundled name or a path to an existing file; raise CheckpointError otherwise."""
    bundled = bundled_model_path(source)
    path = bundled if bundled is not None else Path(source)
    if not path.is_file():
        if bundled is not None:
            raise CheckpointError(f"bundled model {source!r} is not installed (expected {path})")
        if path.is_dir():
            raise CheckpointError("is a folder, not a model file", source)
        known = ", ".join(BUNDLED_MODELS)
        raise CheckpointError(f"model file not found (bundled names: {known})", source)
    return path


def load_model(
    source: str,
    *,
    arch: str | None = None,
    scale: int | None = None,
    hparams: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    allow_exported: bool = False,
) -> LoadedModel:
    """Load a model from a bundled name, a quantsr safetensors file or a foreign checkpoint.

    Foreign checkpoints (``.pth/.pt/.ckpt``, weights-only; or plain ``.safetensors``) are detected from
    their keys (:func:`quantsr_cli.models.loading.detect_arch`: quantsr's architectures, then spandrel's);
    ``LoadedModel.detected`` says what was found.

    Args:
        source: bundled name (``default``), or a file path.
        arch: expected architecture; a foreign file holding another one is an error naming both (the
            fallback family's name takes a built-in file down the generic path). For quantsr files it is
            checked against the file's metadata.
        scale: expected upscaling factor; a mismatch is a CheckpointError. Detected when None.
        hparams: extra builder arguments for ``.pth`` files (e.g. ``{"num_block": 32}``).
        device: where to put the model.
        allow_exported: accept a file ``quantsr export`` wrote (``.onnx``/``.xml``: kind ``"exported"``,
            runs in its runtime only; for ``eval`` and ``upscale``). Otherwise such a file is an error
            saying to use the model it was exported from.
    """
    path = resolve_model_path(source)
    with loading(path):
        if path.suffix.lower() in EXPORTED_SUFFIXES:
            return _load_exported(path, source, arch, scale, allow_exported)
        return _load(path, source, arch, scale, hparams, device)


EXPORTED_SUFFIXES = tuple(_EXPORTED_RUNTIMES)
"""Suffixes of the files ``quantsr export`` writes (run by ``backends.exported``)."""


def refuse_exported(path: Path) -> None:
    """CheckpointError for an exported file (``.onnx``/``.xml``) given where a trainable model is needed."""
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        raise CheckpointError("an exported model runs in `quantsr eval` and `quantsr upscale` only; give the "
                              ".safetensors (or bundled name) it was exported from", path)


def _load_exported(path: Path, source: str, arch: str | None, scale: int | None, allowed: bool) -> LoadedModel:
    if not allowed:
        refuse_exported(path)
    from quantsr_cli.backends.exported import load_exported

    model, meta = load_exported(path)
    if arch is not None and meta["arch"] not in (arch, "exported"):
        raise CheckpointError(f"file holds a {meta['arch']!r} model, not {arch!r}", path)
    if scale is not None and meta["scale"] != scale:
        raise CheckpointError(f"model is x{meta['scale']}, not x{scale} (pass --scale {meta['scale']})", path)
    return LoadedModel(model=model.eval(), arch=meta["arch"], scale=meta["scale"], kind="exported", source=source,
                       meta=meta)


@contextmanager
def loading(path: str | Path) -> Iterator[None]:
    """Turn whatever torch/numpy raise while loading a (hostile) model file into one CheckpointError naming it."""
    try:
        yield
    except QuantSRError:
        raise
    except Exception as exc:  # noqa: BLE001 - the traceback stays available with QUANTSR_DEBUG=1
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot load this model ({type(exc).__name__}: {first})", path) from exc


def _load(path: Path, source: str, arch: str | None, scale: int | None, hparams: dict[str, Any] | None,
          device: str | torch.device) -> LoadedModel:
    detected = None
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and packing_foreign.is_quantsr_file(path):
        meta = decode_meta(packing_io.read_metadata(path))
        if str(meta.get("kind", "")).startswith("diffusion-"):
            from quantsr_cli.diffusion.ckpt import load_model as load_diffusion_model

            model = load_diffusion_model(path)
        else:
            model = packing_io.load_model_file(path)
        file_arch = str(meta.get("arch"))
        file_scale = _checked_meta(meta, model, path)
        if arch is not None and arch != file_arch:
            raise CheckpointError(f"file holds a {file_arch!r} model, not {arch!r}", path)
        kind = str(meta.get("kind", "fp"))
    else:
        state = (packing_foreign.read_state_dict_file(path) if path.suffix.lower() in SAFETENSORS_SUFFIXES
                 else read_state_dict(path))
        model = model_from_state(state, path, arch, **(hparams or {}))
        file_arch = str(model.arch)
        file_scale = int(model.hparams["upscale"])
        meta = {"arch": file_arch, "hparams": dict(model.hparams), "scale": file_scale, "kind": "fp"}
        kind = "fp"
        detected = detection_line(model, path)
    if scale is not None and file_scale != scale:
        raise CheckpointError(f"model is x{file_scale}, not x{scale} (pass --scale {file_scale})", path)
    model.eval().to(device)
    return LoadedModel(model=model, arch=file_arch, scale=file_scale, kind=kind, source=source, meta=meta,
                       detected=detected)


def detection_line(model: nn.Module, path: Path) -> str:
    """One line saying what a foreign checkpoint was detected as, e.g.
    ``detected ESRGAN (spandrel) x4 in model.pth: num_filters=64, num_blocks=23, ...``."""
    hparams = dict(getattr(model, "hparams", {}))
    name = arch_spec(model.arch).display(hparams)
    shown = hparams.get("params") if isinstance(hparams.get("params"), dict) else hparams
    items = [f"{k}={v}" for k, v in shown.items() if k not in ("upscale", "learnable_shortcut") and v is not None]
    extra = ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")
    quantized = len(getattr(model, "quant_patterns", ()))
    return f"detected {name} x{hparams.get('upscale')} in {path.name}" + (f": {extra}" if extra else "") + (
        "" if "params" not in hparams else f" ({quantized} layers quantizable by the generic rule)")


def _checked_meta(meta: dict[str, Any], model: nn.Module, path: Path) -> int:
    """The file's scale, after checking the descriptive metadata against the loaded model.

    ``scale``, ``w_bits``, ``a_bits`` and ``method`` are only informative for the loader, so a file
    whose values are missing, malformed or contradict the model is refused here (CheckpointError)
    rather than failing later with a TypeError.
    """
    upscale = getattr(model, "hparams", {}).get("upscale")
    scale = meta.get("scale", upscale)  # files written before "scale" was recorded: the model's own
    if type(scale) is not int or scale != upscale:
        raise CheckpointError(f"metadata scale {reprlib.repr(scale)} does not match the model (x{upscale})", path)
    for key in ("w_bits", "a_bits"):
        if key in meta and (type(meta[key]) is not int or meta[key] not in QUANT_BITS + (32,)):
            raise CheckpointError(f"metadata {key} {reprlib.repr(meta[key])} is not one of 2, 4, 8, 32", path)
    if "method" in meta and not isinstance(meta["method"], str):
        raise CheckpointError(f"metadata method {reprlib.repr(meta['method'])} is not a name", path)
    return scale


def decode_meta(meta: dict[str, str]) -> dict[str, Any]:
    """Decode the JSON-valued metadata strings of a quantsr file (plain strings stay strings)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def set_depth(loaded: LoadedModel, depth: str) -> None:
    """Run a DQA-trained model at one of its depth variants (``full``, ``half``, ``quarter``)."""
    from quantsr_cli.slim.dqa import apply_depth, resolve_depth

    extra = loaded.meta.get("extra") or {}
    keep = resolve_depth(loaded.model, depth, extra.get("dqa") if isinstance(extra, dict) else None)
    apply_depth(loaded.model, keep)


def read_model_meta(source: str) -> dict[str, Any]:
    """Decoded metadata of a quantsr safetensors file or bundled name (header only)."""
    return decode_meta(packing_io.read_metadata(resolve_model_path(source)))

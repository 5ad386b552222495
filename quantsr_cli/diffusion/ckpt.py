"""Saving and loading diffusion SR models (FP and fake-quantized) in the quantsr safetensors format.

Files are written and read by :mod:`quantsr_cli.packing.io` (``format="quantsr"``, checksummed, atomic).
Metadata written here: ``kind`` (``diffusion-fp`` or ``diffusion-qat``), ``arch`` (a ``one-step-diffusion``
arch of :data:`quantsr_cli.models.ARCHS`), ``hparams`` (JSON builder kwargs), ``quant_spec`` (JSON
:class:`QuantSpec`, quantized files only) and any ``extra`` strings. Loading builds the model with the shared
:func:`~quantsr_cli.models.build_model` and loads it with the shared strict loader
(:func:`~quantsr_cli.models.check_fits` on the meta device, then :func:`~quantsr_cli.models.load_weights`).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch import nn

from quantsr_cli.diffusion.qmodel import QuantSpec, quantize_model, set_quant_enabled
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import arch_names, build_model, check_fits, load_weights
from quantsr_cli.packing.checks import check_finite, on_meta
from quantsr_cli.packing.io import read_file, save_file

KINDS = ("diffusion-fp", "diffusion-qat")
FAMILY = "one-step-diffusion"
"""The :attr:`~quantsr_cli.models.ArchSpec.family` of the architectures these files may hold."""


def save_model(model: nn.Module, path: str | Path, spec: QuantSpec | None = None,
               extra: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` with its arch/hparams (and quantization spec, if quantized)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": KINDS[spec is not None], "arch": str(model.arch),
            "hparams": json.dumps(model.hparams, sort_keys=True),
            "scale": str(int(model.hparams.get("upscale", getattr(model, "upscale", 4))))}
    if spec is not None:
        meta["quant_spec"] = json.dumps(spec.to_dict(), sort_keys=True)
    meta.update(extra or {})
    save_file(dict(model.state_dict()), meta, path)
    return path


def load_model(path: str | Path, quant_enabled: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (quantized ones with their wrappers), strict load.

    Raises:
        CheckpointError: unreadable file, wrong format, or missing/unexpected/mis-shaped keys.
        FormatVersionError: written by a newer format version.
    """
    path = Path(path)
    tensors, meta = read_file(path)
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"not a diffusion model file (kind={meta.get('kind')!r})", path)
    check_finite(tensors, path)
    arch, hparams, spec = _parse_meta(meta, path)
    if arch not in arch_names(FAMILY):
        raise CheckpointError(f"metadata arch {arch!r} is not one of {', '.join(arch_names(FAMILY))}", path)
    try:  # shapes first, on the meta device: the metadata must be backed by the tensors
        probe = on_meta(lambda: _build(arch, hparams, spec))
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"bad arch/hparams/quant_spec metadata ({_short(exc)})", path) from None
    check_fits(probe, tensors, path)
    del probe
    model = load_weights(_build(arch, hparams, spec), tensors, path)
    if meta["kind"] == "diffusion-qat":
        set_quant_enabled(model, quant_enabled)
    return model.eval()


def _build(arch: str, hparams: dict[str, Any], spec: QuantSpec | None) -> nn.Module:
    model = build_model(arch, **hparams)
    if spec is not None:
        quantize_model(model, spec)
    return model


def _short(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _parse_meta(meta: dict[str, str], path: Path) -> tuple[str, dict[str, Any], QuantSpec | None]:
    """``(arch, hparams, quant spec or None)`` from a diffusion file's metadata; CheckpointError when any
    of them is missing or of the wrong type (metadata is untrusted input)."""
    try:
        arch = meta["arch"]
        hparams = json.loads(meta["hparams"])
        raw = json.loads(meta["quant_spec"]) if meta["kind"] == "diffusion-qat" else None
    except KeyError as exc:
        raise CheckpointError(f"metadata lacks {exc.args[0]!r}", path) from None
    except (ValueError, RecursionError):
        raise CheckpointError("metadata 'hparams' or 'quant_spec' is not valid JSON", path) from None
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise CheckpointError(f"metadata 'hparams' must be a JSON object, got {type(hparams).__name__}", path)
    if raw is None:
        return arch, hparams, None
    if not isinstance(raw, dict) or set(raw) - {f.name for f in fields(QuantSpec)}:
        raise CheckpointError("metadata 'quant_spec' must be a JSON object of QuantSpec fields", path)
    types = {"w_bits": int, "a_bits": int, "keep_bits": int, "lowrank": int, "lora": int, "quantizer": str,
             "act_init": str, "smooth": bool, "attention": bool, "smooth_alpha": (int, float)}
    for key, value in raw.items():
        want = types.get(key)
        if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise CheckpointError(f"metadata quant_spec {key}={value!r} has the wrong type", path)
    patterns = raw.get("keep_patterns")
    if patterns is not None:
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise CheckpointError("metadata quant_spec keep_patterns must be a list of names", path)
        raw["keep_patterns"] = tuple(patterns)
    try:
        return arch, hparams, QuantSpec(**raw)
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"bad quant_spec metadata ({_short(exc)})", path) from None

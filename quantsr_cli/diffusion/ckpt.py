"""Saving and loading diffusion SR models (FP and fake-quantized) in the quantsr safetensors format.

Files are written and read by :mod:`quantsr_cli.packing.io` (``format="quantsr"``, checksummed, atomic).
Metadata written here: ``kind`` (``diffusion-fp`` or ``diffusion-qat``), ``arch``, ``hparams`` (JSON
builder kwargs), ``quant_spec`` (JSON :class:`QuantSpec`, quantized files only) and any ``extra`` strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from quantsr_cli.diffusion.osd_tiny import build_osd_model
from quantsr_cli.diffusion.qmodel import QuantSpec, quantize_model, set_quant_enabled
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.packing.io import read_file, read_metadata, save_file

KINDS = ("diffusion-fp", "diffusion-qat")


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


def read_meta(path: str | Path) -> dict[str, str]:
    """The metadata strings of a file written by :func:`save_model` (header only)."""
    return read_metadata(path)


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
    try:
        model = build_osd_model(meta["arch"], **json.loads(meta["hparams"]))
        if meta["kind"] == "diffusion-qat":
            raw = json.loads(meta["quant_spec"])
            if raw.get("keep_patterns") is not None:
                raw["keep_patterns"] = tuple(raw["keep_patterns"])
            quantize_model(model, QuantSpec(**raw))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"bad arch/hparams/quant_spec metadata ({exc})", path) from None
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    shaped = sorted(k for k in set(state) & set(tensors) if state[k].shape != tensors[k].shape)
    if missing or unexpected or shaped:
        parts = [f"{what} keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if keys]
        raise CheckpointError("; ".join(parts), path)
    model.load_state_dict(tensors, strict=True)
    if meta["kind"] == "diffusion-qat":
        set_quant_enabled(model, quant_enabled)
    return model.eval()

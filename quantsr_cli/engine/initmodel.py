"""The model a training run starts from: pretrained weights (``--init``, any architecture quantsr detects),
a fresh model of a registered architecture, or a quantized model file to continue (``--model``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantsr_cli.engine.modelio import (SAFETENSORS_SUFFIXES, load_model, loading, read_model_meta, refuse_exported,
                                        resolve_model_path)
from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import ARCHS, arch_spec, block_hparams, build_model
from quantsr_cli.models.loading import detect_arch, read_state_dict
from quantsr_cli.packing import PackedModule
from quantsr_cli.packing import foreign as packing_foreign
from quantsr_cli.packing import io as packing_io
from quantsr_cli.packing.unpack import to_qat
from quantsr_cli.quant import add_layers_

if TYPE_CHECKING:
    from quantsr_cli.engine.quantize import QuantizeJob

EventFn = Callable[[dict[str, Any]], None]


def load_start_model(source: str) -> nn.Module:
    """The trainable model ``--model`` names: a qat file as is, a packed file rebuilt by ``to_qat``."""
    path = resolve_model_path(source)
    with loading(path):
        model = packing_io.load_model_file(path)
        if any(isinstance(m, PackedModule) for m in model.modules()):
            model = to_qat(model, path=path)
    return model


def extend_start_model(model: nn.Module, quant: QuantConfig, on_event: EventFn | None = None) -> QuantConfig:
    """The config a ``--model`` run trains and writes: the file's own ``layers`` rules, then the run's.

    Rules the run adds (a preset, ``--config`` or flags) may only quantize layers the file leaves full
    precision, e.g. IMDN's optional 8-bit points or its upsampler (:func:`quantsr_cli.quant.add_layers_`,
    which swaps them in ``model``); changing a layer the file quantizes is a ConfigError.
    """
    own = getattr(model, "quant_config", None)
    if own is None:
        return quant
    rules = own.layers + tuple(r for r in quant.layers if r not in own.layers)
    merged = replace(quant, layers=rules)
    if rules != own.layers:
        added = add_layers_(model, merged)
        _say(on_event, f"--model: {len(added)} more layers quantized by the layers rules "
                       f"({', '.join(added[:4])}{', ...' if len(added) > 4 else ''})")
    else:
        model.quant_config = merged
    return merged


def share_qv_hparams(arch: str, share: bool) -> dict[str, Any]:
    """Builder argument for ``share_qv_quantizer`` (empty when off); ConfigError for an arch without it."""
    if not share:
        return {}
    spec = ARCHS.get(arch)
    if spec is None or "share_qv_quantizer" not in spec.defaults:
        having = ", ".join(n for n, s in ARCHS.items() if "share_qv_quantizer" in s.defaults)
        raise ConfigError(f"share_qv_quantizer applies to window attention ({having}), not to arch {arch!r}")
    return {"share_qv_quantizer": True}


def with_shared_qv(model: nn.Module) -> nn.Module:
    """``model`` rebuilt with ``share_qv_quantizer=True`` and the same weights (the FP state dict is the same)."""
    if model.hparams.get("share_qv_quantizer"):
        return model
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the run's random stream
        new = build_model(model.arch, **{**model.hparams, "share_qv_quantizer": True})
    new.load_state_dict(model.state_dict(), strict=True)
    return new


def build_initial_model(job: QuantizeJob, on_event: EventFn | None = None) -> nn.Module:
    """The FP model the quantizers are attached to: pretrained from ``--init`` or freshly initialised.

    ``on_event`` gets ``{"event": "log", "message": ...}`` lines: what a foreign ``--init`` was detected as,
    or, for a fresh model, that it starts from random weights and where the official weights are.
    """
    shared = share_qv_hparams(job.arch, job.share_qv_quantizer)
    model = _initial_fp_model(job, {**block_hparams(job.arch, job.blocks), **shared}, on_event)
    return with_shared_qv(model) if shared else model  # a safetensors --init keeps its file's hparams


def _say(on_event: EventFn | None, message: str | None) -> None:
    if on_event is not None and message:
        on_event({"event": "log", "message": message})


def random_init_notice(arch: str) -> str:
    """The line a run without ``--init`` starts with: random weights, and where the official ones are."""
    spec = arch_spec(arch)
    hint = (f"; to start from the official weights instead, pass --init with {spec.pretrained}" if spec.pretrained
            else "; pass --init FILE to start from pretrained weights")
    return (f"no --init: training {arch} from random weights (the papers quantize pretrained full-precision "
            f"models, and a random start needs far more iterations to reach their quality){hint}")


def _initial_fp_model(job: QuantizeJob, extra: dict[str, Any], on_event: EventFn | None = None) -> nn.Module:
    """Pretrained from ``--init`` (into a deeper model when ``--blocks`` asks) or fresh, with ``extra`` hparams."""
    if job.init and job.blocks:
        state = read_state_dict(Path(job.init))
        try:
            _, found = detect_arch(state)
        except Exception:  # noqa: BLE001 - fall back to the strict loader's own error
            found = {}
        if blocks_in(job.arch, found) not in (None, job.blocks):
            return load_into_deeper(job, state, extra)
    if job.init:
        loaded = load_model(job.init, arch=job.arch, scale=job.scale, hparams=extra or None)
        if loaded.kind != "fp":
            raise ConfigError(f"--init {job.init}: expected full-precision weights, got a {loaded.kind} model")
        _say(on_event, loaded.detected)
        return loaded.model
    _say(on_event, random_init_notice(job.arch))
    return build_model(job.arch, upscale=job.scale, **extra)


def init_arch(source: str) -> tuple[str, dict[str, Any]]:
    """The architecture and hyperparameters of an ``--init`` file (a quantsr file's metadata, or detected
    from a foreign checkpoint's keys), so ``quantize --init FILE`` needs no ``--arch``/``--scale``."""
    path = resolve_model_path(source)
    refuse_exported(path)
    with loading(path):
        if packing_foreign.is_quantsr_file(path):
            meta = read_model_meta(source)
            hparams = meta.get("hparams") if isinstance(meta.get("hparams"), dict) else {}
            return str(meta.get("arch")), dict(hparams)
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            return detect_arch(packing_foreign.read_state_dict_file(path), path)
        return detect_arch(read_state_dict(path), path)


def blocks_in(arch: str, hparams: dict[str, Any]) -> int | None:
    """Number of residual blocks described by ``hparams`` (None when unknown or the depth is fixed)."""
    spec = ARCHS.get(arch)
    return None if spec is None else spec.block_count(hparams)


def load_into_deeper(job: QuantizeJob, state: dict[str, torch.Tensor], extra: dict[str, Any]) -> nn.Module:
    """Load pretrained weights of a shallower model into the first blocks of a deeper one.

    QuantSR+-T starts from an 8-RSTB SwinIR with the official 4-RSTB SwinIR-S weights in RSTBs 0-3
    (``strict_load_g: false`` in the released yml); the extra blocks keep their fresh initialisation.
    Only missing keys of the extra blocks are tolerated; anything else is a CheckpointError.
    """
    model = build_model(job.arch, upscale=job.scale, **extra)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else str(exc).splitlines()[0]
        raise CheckpointError(f"weights do not fit {job.arch} x{job.scale} with {job.blocks} blocks: {detail[:200]}",
                              job.init) from None
    prefix = model.block_names()[0].rsplit(".", 1)[0]
    have = {int(k.split(".")[1]) for k in state if k.startswith(prefix + ".")}
    bad_missing = [k for k in result.missing_keys
                   if not (k.startswith(prefix + ".") and int(k.split(".")[1]) not in have)]
    if bad_missing or result.unexpected_keys:
        keys = (bad_missing + list(result.unexpected_keys))[:5]
        raise CheckpointError(f"weights do not fit {job.arch} with {job.blocks} blocks: {', '.join(keys)}", job.init)
    return model

"""Reading foreign ``.pth``/``.pt`` checkpoints safely, strict loading, and architecture detection.

Only ``torch.load(path, map_location="cpu", weights_only=True)`` is used: files that need arbitrary
unpickling are refused, never executed. Before loading, the sizes a file declares are checked against
the file (:func:`~quantsr_cli.models.pthcheck.check_archive`); after loading, every tensor must be a
plain, finite CPU tensor backed by its storage (:func:`~quantsr_cli.models.pthcheck.check_tensor`).
:func:`check_fits` compares a state dict with a model's expected keys and shapes without copying
anything, so it works on a model built on the ``meta`` device (:func:`~quantsr_cli.models.probe_model`)
before the real one is allocated.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import Tensor, nn

from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models.pthcheck import check_archive, check_tensor
from quantsr_cli.models.registry import ARCHS, arch_names, arch_spec, build_model, probe_model
from quantsr_cli.models.spec import LayoutNotSupported

WRAPPER_KEYS = ("params_ema", "params-ema", "params", "model_state_dict", "state_dict", "model", "net")
"""Container keys unwrapped in this order of preference (BasicSR EMA weights first; the rest as spandrel)."""

COMMON_PREFIXES = ("module.", "netG.")
"""Key prefixes removed when every key has them (``nn.DataParallel``, BasicSR/ESRGAN generator dumps)."""

_SHOW = 5  # how many offending keys an error message lists


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` state dict on the CPU.

    Unwraps the usual containers (:data:`WRAPPER_KEYS`, ``params_ema`` preferred) and strips a leading
    ``module.`` (``nn.DataParallel``) from every key; see :func:`canonical_state_dict`.

    Raises:
        CheckpointError: the file is missing, unreadable/truncated, needs unsafe unpickling, or holds
            something other than a mapping of string keys to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("no such checkpoint file", path)
    if path.stat().st_size == 0:
        raise CheckpointError("empty file (0 bytes)", path)
    check_archive(path)
    try:
        with warnings.catch_warnings():  # torch's deprecation chatter about odd tensors is not for our users
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL mod.name" or "unsupported GLOBAL mod.name whose module ..."
        refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"refused to unpickle {refused.group(1)}: only tensors and plain containers are allowed "
                "(weights_only loading)",
                path,
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
        reason = detail.group(1).strip() if detail else _unpickling_reason(exc)
        raise CheckpointError(f"not a readable PyTorch checkpoint ({reason[:200]})", path) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, zip errors... for bad files
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        raise CheckpointError(f"not a readable PyTorch checkpoint ({reason})", path) from exc
    return canonical_state_dict(obj, path)


def canonical_state_dict(obj: object, path: str | Path | None = None) -> dict[str, Tensor]:
    """The flat ``{key: tensor}`` state dict inside a loaded checkpoint object.

    Unwraps up to three containers (a :data:`WRAPPER_KEYS` entry holding a mapping, or a mapping's only
    value), strips ``module.`` from each key and a :data:`COMMON_PREFIXES` prefix shared by all keys, and
    checks every tensor (:func:`~quantsr_cli.models.pthcheck.check_tensor`).

    Raises:
        CheckpointError: something other than a non-empty mapping of string keys to tensors.
    """
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None and len(obj) == 1 and isinstance(next(iter(obj.values())), Mapping):
            inner = next(iter(obj.values()))
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"not a state dict (found {type(obj).__name__})", path)
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise CheckpointError(f"not a state dict: entry {key!r} holds a {type(value).__name__}", path)
        key = key.removeprefix("module.")
        check_tensor(key, value, path)
        state[key] = value
    for prefix in COMMON_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], path: str | Path | None = None) -> None:
    """CheckpointError unless ``state_dict`` has exactly the keys and shapes ``model`` expects.

    Copies nothing, so ``model`` may live on the ``meta`` device. Keys matching the model's
    ``derived_keys`` (e.g. official SwinIR ``attn_mask`` buffers) are accepted and ignored.
    The error names ``path`` and lists the first missing, unexpected and mis-shaped keys, plus the
    architecture the file looks like when that differs from the model.
    """
    derived = getattr(model, "derived_keys", ())
    given = {k: v for k, v in state_dict.items() if not any(fnmatchcase(k, p) for p in derived)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} (file {tuple(given[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        for label, items in groups:
            if items:
                more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                parts.append(f"{label} {', '.join(items[:_SHOW])}{more}")
        arch = getattr(model, "arch", type(model).__name__)
        hparams = getattr(model, "hparams", {})
        message = f"does not fit {arch} {_fmt(hparams)}: " + "; ".join(parts)
        try:
            file_arch, file_hparams = detect_arch(state_dict)
        except CheckpointError:
            pass
        else:
            if (file_arch, file_hparams) != (arch, {k: hparams.get(k) for k in file_hparams}):
                message += f" (the file looks like {file_arch} {_fmt(file_hparams)})"
        raise CheckpointError(message, path)


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], path: str | Path | None = None) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly (in place) and return the model.

    Nothing is copied unless every key and shape fits (:func:`check_fits`). Non-persistent
    ``learnable_shortcut`` buffers are not expected in the file.

    Raises:
        CheckpointError: naming ``path``, for any key, shape or value torch cannot load.
    """
    check_fits(model, state_dict, path)
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise CheckpointError(f"tensors do not fit the model ({first[:200]})", path) from None
    return model


def detect_arch(state_dict: Mapping[str, Tensor], path: str | Path | None = None) -> tuple[str, dict[str, object]]:
    """The registered architecture and its hyperparameters, from key names and shapes.

    Asks each :data:`~quantsr_cli.models.registry.ARCHS` spec's ``detect`` in registry order, ``fallback``
    families (spandrel's architectures) last; the first that recognises the weights wins. A spec that
    recognises them as a variant it does not support (:class:`~quantsr_cli.models.spec.LayoutNotSupported`)
    or finds its keys malformed does not stop the search; its message is the error when no other spec
    recognises them.

    Returns:
        ``(arch, hparams)`` such that ``build_model(arch, **hparams)`` fits the state dict in the
        architecture's own layout (``spec.convert``) (e.g.
        ``("imdn", {"upscale": 4, "num_feat": 64, "num_modules": 6, "learnable_shortcut": False})``).
        Hyperparameters that leave no trace in the weights (``res_scale``) are left at their defaults.

    Raises:
        CheckpointError: no registered architecture recognises the weights, naming why when one nearly did.
    """
    hint = None
    specs = sorted(ARCHS.values(), key=lambda spec: spec.fallback)
    for spec in specs:
        try:
            hparams = spec.detect(state_dict)
        except LayoutNotSupported as exc:
            hint = hint or str(exc)
            continue
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            hint = hint or f"unrecognised checkpoint layout ({exc})"
            continue
        if hparams is not None:
            return spec.name, hparams
    if hint is not None:
        raise CheckpointError(hint, path)
    first = ", ".join(sorted(state_dict)[:3])
    raise CheckpointError(f"cannot recognise the architecture from its keys ({first}, ...); "
                          f"supported: {', '.join(arch_names('sr'))}", path)


def detect_as(state_dict: Mapping[str, Tensor], arch: str | None, path: str | Path | None = None) -> tuple[str, dict[str, object]]:
    """:func:`detect_arch`, checked against an expected ``arch``: a file holding another architecture is a
    CheckpointError naming both. ``arch`` = a ``fallback`` family (spandrel's) takes the file down that
    family's generic path even when a built-in architecture knows it."""
    if arch is not None and arch_spec(arch).fallback:
        try:
            found = arch_spec(arch).detect(state_dict)
        except LayoutNotSupported as exc:
            raise CheckpointError(str(exc), path) from None
        if found is None:
            raise CheckpointError(f"{arch} does not recognise these weights", path)
        return arch, found
    found_arch, hparams = detect_arch(state_dict, path)
    if arch is not None and arch != found_arch:
        raise CheckpointError(f"holds {arch_spec(found_arch).display(hparams)} weights, not {arch} "
                              f"(drop --arch: the architecture is detected from the file)", path)
    return found_arch, hparams


def model_from_state(state: Mapping[str, Tensor], path: str | Path | None = None, arch: str | None = None,
                     **overrides: object) -> nn.Module:
    """Detect (or check ``arch``), convert to the model's layout, check shapes on the meta device, build,
    and load strictly. ``overrides`` replace detected hyperparameters (e.g. ``res_scale``).

    Raises:
        CheckpointError: unrecognised weights, another architecture than ``arch``, or weights that do not
            fit (ConfigError from a builder is reported as a CheckpointError naming the file).
    """
    found, detected = detect_as(state, arch, path)
    spec = arch_spec(found)
    params = {**detected, **overrides}
    if spec.convert is not None:
        try:
            state = spec.convert(state, params)
        except LayoutNotSupported as exc:
            raise CheckpointError(str(exc), path) from None
    try:  # shapes first, on the meta device: the real model is only built once the file backs it
        check_fits(probe_model(found, **params), state, path)
        model = build_model(found, **params)
    except ConfigError as exc:
        raise CheckpointError(f"cannot build {spec.display(params)} for these weights: {exc}", path) from None
    return load_weights(model, state, path)


def model_from_file(path: str | Path, arch: str | None = None, **hparams: object) -> nn.Module:
    """Read a ``.pth``/``.pt`` checkpoint and :func:`model_from_state` it."""
    return model_from_state(read_state_dict(path), path, arch, **hparams)


def _fmt(hparams: Mapping[str, object]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in hparams.items()) + ")"


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only error (not its advice to load unsafely)."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith(boilerplate):
            return line[:200]
    return "refused by weights_only loading"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

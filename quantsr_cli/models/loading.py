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

from quantsr_cli.errors import CheckpointError
from quantsr_cli.models.pthcheck import check_archive, check_tensor
from quantsr_cli.models.registry import ARCHS, arch_names, build_model
from quantsr_cli.models.spec import LayoutNotSupported

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
"""Container keys unwrapped in this order of preference (BasicSR EMA weights first)."""

_SHOW = 5  # how many offending keys an error message lists


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{key: tensor}`` state dict on the CPU.

    Unwraps ``params_ema`` (preferred), ``params``, ``state_dict`` or ``model`` containers and strips a
    leading ``module.`` (``nn.DataParallel``) from every key.

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
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
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

    Asks each :data:`~quantsr_cli.models.registry.ARCHS` spec's ``detect`` in registry order; the first
    that recognises the weights wins. A spec that recognises them as a variant it does not support
    (:class:`~quantsr_cli.models.spec.LayoutNotSupported`) or finds its keys malformed does not stop the
    search; its message is the error when no other spec recognises them.

    Returns:
        ``(arch, hparams)`` such that ``build_model(arch, **hparams)`` fits the state dict (e.g.
        ``("imdn", {"upscale": 4, "num_feat": 64, "num_modules": 6, "learnable_shortcut": False})``).
        Hyperparameters that leave no trace in the weights (``res_scale``) are left at their defaults.

    Raises:
        CheckpointError: no registered architecture recognises the weights, naming why when one nearly did.
    """
    hint = None
    for spec in ARCHS.values():
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


def model_from_file(path: str | Path, arch: str | None = None, **hparams: object) -> nn.Module:
    """Read a checkpoint, detect its architecture, build the model and load the weights strictly.

    Args:
        path: ``.pth``/``.pt`` file.
        arch: expected architecture; a file holding another one raises :class:`CheckpointError`.
        **hparams: overrides of the detected hyperparameters (e.g. ``res_scale``).
    """
    state = read_state_dict(path)
    found, detected = detect_arch(state, path)
    if arch is not None and arch != found:
        raise CheckpointError(f"holds {found} weights, not {arch}", path)
    model = build_model(found, **{**detected, **hparams})
    return load_weights(model, state, path)


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

"""Resumable training state: model, optimizer, RNG and trainer counters in one safetensors file.

Files are ``<run_dir>/checkpoints/state_<iteration:07d>.safetensors``, written atomically; the newest
that loads wins on ``--resume`` (a truncated newest file is skipped with a warning event, so a crash
while saving never loses the previous state). The last ``keep`` files are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import CheckpointError
from quantsr_cli.fileio import dumps
from quantsr_cli.packing import io as packing_io
from quantsr_cli.packing.state import flatten_optimizer, unflatten_optimizer

STATE_PREFIX = "state_"


def save_state(
    run_dir: Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    model_meta: dict[str, str],
    keep: int = 2,
    ema: nn.Module | None = None,
) -> Path:
    """Write the resumable state after ``iteration`` completed steps (and the EMA model); prune older files."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_tensors, opt_info = flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = dict(model_meta)
    meta["kind"] = "train_state"
    meta["iteration"] = str(iteration)
    meta["optimizer"] = dumps(opt_info)
    meta["trainer"] = dumps(trainer_state)
    path = folder / f"{STATE_PREFIX}{iteration:07d}.safetensors"
    packing_io.save_file(tensors, meta, path)
    states = sorted(folder.glob(f"{STATE_PREFIX}*.safetensors"))
    for old in states[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_states(run_dir: Path) -> list[Path]:
    """Saved state files of a run, newest first."""
    folder = run_dir / "checkpoints"
    return sorted(folder.glob(f"{STATE_PREFIX}*.safetensors"), reverse=True) if folder.is_dir() else []


def load_latest_state(run_dir: Path, on_skip: Any = None) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None:
    """Read the newest loadable state file of ``run_dir`` (None when there is none)."""
    for path in list_states(run_dir):
        try:
            tensors, meta = packing_io.read_file(path)
            _check_state_meta(meta, path)
        except CheckpointError as exc:
            if on_skip:
                on_skip(f"skipping unreadable checkpoint {path.name}: {exc}")
            continue
        return path, tensors, meta
    return None


def _check_state_meta(meta: dict[str, str], path: Path) -> None:
    """A state file's own metadata must be what :func:`save_state` writes (else it is skipped)."""
    try:
        ok = (meta.get("kind") == "train_state" and meta.get("iteration", "").isdigit()
              and isinstance(json.loads(meta["trainer"]), dict)
              and isinstance(json.loads(meta["optimizer"]).get("param_groups"), list))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointError("not a quantsr training state (bad kind/iteration/trainer/optimizer metadata)", path)


def restore_state(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    ema: nn.Module | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load model/optimizer/RNG (and the EMA model) from a state file; return (iteration, trainer_state).

    A state written without EMA weights starts the EMA model from the restored model.
    """
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    ema_sd = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    try:
        model.load_state_dict(model_sd, strict=True)
        if ema is not None:
            ema.load_state_dict(ema_sd or model_sd, strict=True)
        optimizer.load_state_dict(unflatten_optimizer(tensors, json.loads(meta["optimizer"])))
        torch.set_rng_state(tensors["rng.torch"])
        return int(meta["iteration"]), json.loads(meta["trainer"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise CheckpointError(f"checkpoint does not fit this run ({first})", path) from None

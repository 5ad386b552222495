"""Optimizer state <-> safetensors tensors + JSON, for resumable training files.

A ``torch.optim`` state dict mixes tensors (``exp_avg``, ``step`` ...) and plain values (param groups,
hyperparameters). :func:`flatten_optimizer` splits it into tensors named ``optim.<param index>.<name>``
and a JSON-able dict; :func:`unflatten_optimizer` rebuilds the state dict that
``optimizer.load_state_dict`` takes. No pickle is involved anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

PREFIX = "optim."


def flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able info)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{PREFIX}{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer` (tensors not starting with ``optim.`` are ignored)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entries in info.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": info["param_groups"]}

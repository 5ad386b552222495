"""A model file's metadata must be backed by its tensors before anything is built from it.

A safetensors header cannot lie about its tensors (every shape is backed by bytes of the file), but
the metadata (``arch``, ``hparams``) can say anything: 324 bytes claiming ``num_block: 1000000000``.
So loaders (quantsr models here, diffusion models in :mod:`quantsr_cli.diffusion.ckpt`) first build the
described model on the ``meta`` device -- builders check hyperparameter types and upper bounds before
constructing anything, and meta tensors take no memory -- and call :func:`check_backed`: every
parameter and buffer that model would allocate must be in the file with the same shape (a packed
layer's weight as its ``qweight`` codes). Only then is the real model built, so its size is bounded
by the file's. :func:`check_finite` refuses NaN/Inf values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from quantsr_cli.errors import CheckpointError
from quantsr_cli.packing.layout import packed_row_bytes

__all__ = ["check_backed", "check_finite", "on_meta"]

M = TypeVar("M", bound=nn.Module)
_SHOW = 4


def on_meta(build: Callable[[], M]) -> M:
    """Run a model builder on the ``meta`` device (shapes only, no memory)."""
    with torch.device("meta"):
        return build()


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | Path | None) -> None:
    """CheckpointError naming the first floating tensor that holds NaN or Inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {key} holds NaN or Inf values", path)


def _packed_shape(weight: tuple[int, ...], spec: Mapping[str, Any]) -> tuple[int, ...] | None:
    bits = spec.get("w_bits")
    if bits not in (2, 4, 8) or isinstance(bits, bool):
        return None  # a malformed entry: build_packed_model names it
    k = 1
    for s in weight[1:]:
        k *= int(s)
    return int(weight[0]), packed_row_bytes(k, int(bits))


def check_backed(
    probe: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    path: str | Path | None,
    packed: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """CheckpointError unless every state-dict entry of ``probe`` (a meta model) is in ``tensors``, same shape.

    Args:
        probe: the model the metadata describes, built on the meta device.
        tensors: the file's tensors.
        path: the file, for the message.
        packed: ``layers`` entries of a packed file by layer name: those layers' ``weight`` must be
            stored as ``<layer>.qweight`` codes of the packed shape, their ``bias`` lives in ``qparams``.
    """
    packed = packed or {}
    missing: list[str] = []
    wrong: list[str] = []
    for key, ref in probe.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        spec = packed.get(layer)
        if spec is not None and spec.get("type") != "act" and leaf in ("weight", "bias"):
            if leaf == "bias":
                continue
            key, want = f"{layer}.qweight", _packed_shape(tuple(ref.shape), spec)
            if want is None:
                continue
        else:
            want = tuple(ref.shape)
        got = tensors.get(key)
        if got is None:
            missing.append(key)
        elif tuple(got.shape) != want:
            wrong.append(f"{key} (file {list(got.shape)}, metadata {list(want)})")
    if missing or wrong:
        parts = [f"{label} {', '.join(items[:_SHOW])}" + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")
                 for label, items in (("missing tensors", missing), ("shape mismatch", wrong)) if items]
        arch = getattr(probe, "arch", type(probe).__name__)
        raise CheckpointError("; ".join(parts) + f" (the metadata describes a {arch} model these tensors do not hold; "
                              "nothing was built)", path)

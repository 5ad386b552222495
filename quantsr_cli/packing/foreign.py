"""Plain safetensors weights of foreign models (a Real-ESRGAN, SwinIR, HAT ... ``.safetensors``).

quantsr's own files carry ``format=quantsr`` metadata (:mod:`quantsr_cli.packing.io`); any other safetensors
file is read here as a state dict for architecture detection (``quantsr_cli.models``), under the same
checks as a foreign ``.pth``: a size bound and plain, finite, real-valued tensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load as _st_load

from quantsr_cli.errors import CheckpointError, FormatVersionError
from quantsr_cli.models.pthcheck import MAX_CHECKPOINT_BYTES, check_tensor
from quantsr_cli.packing.io import FORMAT, MAX_HEADER_BYTES, _open_bytes, _parse_header

__all__ = ["is_quantsr_file", "read_state_dict_file"]


def is_quantsr_file(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file whose metadata says ``format=quantsr`` (well-formed or not:
    the quantsr reader then names what is wrong with it); False for any other file, including plain
    safetensors weights of a foreign model."""
    path = Path(path)
    raw, size = _open_bytes(path, limit=MAX_HEADER_BYTES)
    try:
        _parse_header(raw, size, path)
    except FormatVersionError:
        return True
    except CheckpointError:
        try:
            (n,) = struct.unpack("<Q", raw[:8])
            meta = json.loads(raw[8:8 + n].decode("utf-8")).get("__metadata__")
        except Exception:  # noqa: BLE001 - not even a safetensors header: not ours
            return False
        return isinstance(meta, dict) and meta.get("format") == FORMAT
    return True


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain ``.safetensors`` weights file (a foreign model's; no quantsr metadata needed).

    The file is refused when larger than :data:`~quantsr_cli.models.pthcheck.MAX_CHECKPOINT_BYTES`; every
    tensor must be a plain, finite, real-valued tensor (:func:`~quantsr_cli.models.pthcheck.check_tensor`).

    Raises:
        CheckpointError: missing, unreadable, too large, not safetensors, or holding unusable tensors.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{size / 2**30:.1f} GiB is larger than any SR model file "
                              f"({MAX_CHECKPOINT_BYTES >> 30} GiB limit)", path)
    raw, size = _open_bytes(path)
    if size < 8 or len(raw) < 8:
        raise CheckpointError("not a safetensors file (empty or shorter than 8 bytes)", path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"not a safetensors file (header length {n:,} in a {size:,}-byte file)", path)
    try:
        tensors = _st_load(raw)
    except Exception as exc:  # safetensors raises SafetensorError, ValueError, ... on malformed input
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"not a readable safetensors file ({first})", path) from None
    if not tensors:
        raise CheckpointError("holds no tensors", path)
    for key, value in tensors.items():
        check_tensor(key, value, path)
    return tensors

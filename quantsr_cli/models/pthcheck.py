"""Checks of a foreign ``.pth``/``.pt`` file before and after ``torch.load``, so that no small file can
exhaust memory and every tensor that reaches a model is a plain, finite, CPU tensor.

Before loading (:func:`check_archive`): the data a file *declares* -- the uncompressed sizes in a zip
archive's directory, and the storage sizes in its pickle (zip or legacy format; read with
:mod:`pickletools`, which parses opcodes and never executes anything) -- must fit in the file (twice its
size plus 1 MiB of slack) and under :data:`MAX_CHECKPOINT_BYTES`. A 130 KB archive that inflates to
128 MiB is refused here, before torch allocates anything.

After loading (:func:`check_tensor`): strided CPU tensors of a real dtype (no sparse, quantized, complex
or meta tensors), each backed by its own storage (a broadcast view whose storage holds 1 element of a
huge shape would otherwise make the detected architecture huge), floating values finite.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

import torch

from quantsr_cli.errors import CheckpointError

__all__ = ["MAX_CHECKPOINT_BYTES", "check_archive", "check_tensor"]

MAX_CHECKPOINT_BYTES = 4 << 30
"""Largest amount of tensor data (bytes) a ``.pth`` file may declare: 4 GiB, ~20x the largest SR model."""

_SLACK = 1 << 20
_ELEMENT_BYTES = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}
_SIMPLE = {"BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING",
           "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "NONE", "NEWTRUE", "NEWFALSE",
           "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_MARK_CONSUMERS = {"LIST", "DICT", "SETITEMS", "APPENDS", "OBJ", "INST", "FROZENSET", "ADDITEMS", "POP_MARK"}
_UNKNOWN = object()


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_archive(path: Path) -> None:
    """Refuse a checkpoint that declares more data than it can hold (see the module docstring)."""
    size = path.stat().st_size
    allowed = 2 * size + _SLACK
    declared = 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                total = sum(max(info.file_size, 0) for info in infos)
                if total > allowed or total > MAX_CHECKPOINT_BYTES:
                    raise CheckpointError(f"archive declares {_mb(total)} of data in a {_mb(size)} file "
                                          "(a compressed archive bomb?); refused before loading", path)
                pkl = next((i for i in infos if i.filename.endswith("data.pkl")), None)
                if pkl is not None:
                    with zf.open(pkl) as fh:
                        declared = _storage_bytes(fh)
        else:
            with open(path, "rb") as fh:
                for _ in range(3):  # legacy format: magic number, protocol version, system info
                    for _op in pickletools.genops(fh):
                        pass
                declared = _storage_bytes(fh)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - not parseable here: torch.load reports what is wrong with it
        return
    if declared > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"declares {_mb(declared)} of tensor storage, above the "
                              f"{MAX_CHECKPOINT_BYTES >> 30} GiB limit for a model file", path)
    if declared > allowed:
        raise CheckpointError(f"declares {_mb(declared)} of tensor storage in a {_mb(size)} file; "
                              "refused before loading", path)


def _storage_bytes(fh: io.BufferedIOBase) -> int:
    """Total bytes of the storages a torch pickle declares (``('storage', type, key, location, numel)``)."""
    frames: list[list[object]] = [[]]
    memo: dict[object, object] = {}
    found: dict[object, int] = {}
    for op, arg, _ in pickletools.genops(fh):
        name, cur = op.name, frames[-1]
        if name == "MARK":
            frames.append([])
        elif name in _SIMPLE:
            cur.append(arg)
        elif name == "GLOBAL":
            cur.append(("global", str(arg)))
        elif name == "STACK_GLOBAL":
            parts = [cur.pop() if cur else _UNKNOWN for _ in range(2)]
            cur.append(("global", f"{parts[1]} {parts[0]}"))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = cur[-1] if cur else _UNKNOWN
        elif name == "MEMOIZE":
            memo[len(memo)] = cur[-1] if cur else _UNKNOWN
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            cur.append(memo.get(arg, _UNKNOWN))
        elif name == "TUPLE":
            items = frames.pop() if len(frames) > 1 else []
            frames[-1].append(("tuple", tuple(items)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            n = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}.get(name, 0)
            items = cur[len(cur) - n:] if n and len(cur) >= n else []
            del cur[len(cur) - len(items):]
            cur.append(("tuple", tuple(items)))
        elif name == "BINPERSID":
            pid = cur.pop() if cur else _UNKNOWN
            _record(pid, found)
            cur.append(_UNKNOWN)
        elif name in _MARK_CONSUMERS:
            if len(frames) > 1:
                frames.pop()
            if name != "POP_MARK":
                frames[-1].append(_UNKNOWN)
        elif name != "STOP":
            cur.append(_UNKNOWN)
        if name == "STOP":
            break
    return sum(found.values())


def _record(pid: object, found: dict[object, int]) -> None:
    if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "tuple"):
        return
    items = pid[1]
    if len(items) < 5 or items[0] not in ("storage", b"storage"):
        return
    kind, key, numel = items[1], items[2], items[4]
    type_name = kind[1].split()[-1].split(".")[-1] if isinstance(kind, tuple) and kind[0] == "global" else ""
    if isinstance(numel, int) and not isinstance(numel, bool) and isinstance(key, (str, bytes)):
        found[key] = max(found.get(key, 0), max(numel, 0) * _ELEMENT_BYTES.get(type_name, 1))


_REAL = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
         torch.int32, torch.int64, torch.bool}


def check_tensor(key: str, t: torch.Tensor, path: Path) -> None:
    """CheckpointError unless ``t`` is a plain CPU tensor of a real dtype, backed by its storage, and finite."""
    if t.layout != torch.strided or t.is_quantized or t.dtype not in _REAL:
        what = "a quantized" if t.is_quantized else (f"a {t.layout}" if t.layout != torch.strided else "")
        raise CheckpointError(f"tensor {key} is {what or 'a'} {t.dtype} tensor; only plain real-valued "
                              "tensors can be model weights", path)
    if t.device.type != "cpu":
        raise CheckpointError(f"tensor {key} holds no data (device {t.device.type})", path)
    need = (t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) + 1) * t.element_size()
    held = t.untyped_storage().nbytes()
    if t.numel() and (need > held or t.numel() * t.element_size() > held):
        raise CheckpointError(f"tensor {key} of shape {list(t.shape)} is a view larger than its storage "
                              f"({held} bytes); refused", path)
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"tensor {key} holds NaN or Inf values", path)

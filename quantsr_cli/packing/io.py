"""quantsr safetensors files: the package's only safetensors user.

A file is a standard safetensors file whose ``__metadata__`` (string -> string) holds:

* ``format`` = ``"quantsr"``, ``format_version`` = ``"1"`` (a newer version is refused with
  :class:`FormatVersionError`), ``data_sha256`` (SHA-256 of the data section, checked on read);
* for models: ``kind`` (``"packed"`` | ``"qat"`` | ``"fp"``), ``arch``, ``hparams`` (JSON builder kwargs),
  ``scale``, ``w_bits``, ``a_bits``, ``method``; optional ``layer_bits`` (JSON ``[[pattern, w_bits, a_bits],
  ...]``: the per-layer bit rules of the config, the last match wins), ``skip_blocks`` (JSON list of skipped
  residual blocks) and ``extra`` (free JSON: training command, slim history, ...);
* packed files store each packed layer as ``<layer>.qweight`` (uint8 codes, see
  :class:`~quantsr_cli.packing.layout.PackFormat`) and ``<layer>.qparams`` (float32
  ``[w_scale, a_step, a_shift, bias]``), and describe the layers in ``layers``: a JSON table
  ``{"fields": [...], "rows": [[...], ...]}``, one row per packed module, columns ``name, type, format,
  shape, w_bits, w_zero, per_channel, bias, a_bits, a_qmin, a_qmax, shift, shift_dim, stride, padding,
  dilation, groups`` (``null`` where not applicable);
* other writers (training state) add their own keys.

Every failure to read or fit a file raises :class:`CheckpointError` (or its subclass
:class:`FormatVersionError`) naming the file. Paths found inside metadata are never used to write.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn

from quantsr_cli.errors import CheckpointError, FormatVersionError, QuantSRError
from quantsr_cli.packing.checks import check_backed, check_finite, on_meta
from quantsr_cli.fileio import atomic_write
from quantsr_cli.packing.convert import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    build_packed_model,
    decode_layer_bits,
    decode_layers,
    load_tensors_strict,
    model_metadata,
    pack_model,
    restore_skips,
    state_tensors,
    to_packed,
)
from quantsr_cli.packing.modules import PackedModule

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "save_file", "read_file", "read_metadata", "pack_model",
    "to_packed", "build_packed_model", "model_metadata", "save_model", "load_model_file", "size_report",
]

MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest JSON header read (safetensors' own cap is 100 MB; ours are far below 1 MB): a DoS guard."""

MAX_META_VALUE = 4 * 1024 * 1024
"""Largest metadata value: it is JSON-decoded, and a few MB of JSON can become hundreds of MB of objects."""


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise TypeError(f"tensors must map str to Tensor, got {key!r}: {type(value).__name__}")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def serialize(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """The exact bytes :func:`save_file` writes (``format``/``format_version``/``data_sha256`` added)."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata must map str to str (JSON-encode other values)")
    meta = {k: v for k, v in meta.items() if k != "data_sha256"}
    if meta.setdefault("format", FORMAT) != FORMAT or meta.setdefault("format_version", str(FORMAT_VERSION)) != str(FORMAT_VERSION):
        raise ValueError(f"cannot write format={meta.get('format')!r} version {meta.get('format_version')!r}")
    tensors = _prepare(tensors)
    first = _st_save(tensors, metadata=meta)
    (n,) = struct.unpack("<Q", first[:8])
    meta["data_sha256"] = hashlib.sha256(first[8 + n:]).hexdigest()
    return _st_save(tensors, metadata=meta)


def save_file(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | Path) -> None:
    """Write a quantsr safetensors file atomically (:func:`quantsr_cli.fileio.atomic_write`).

    Args:
        tensors: name -> tensor (moved to CPU; shared storage is copied).
        meta: metadata strings; ``format``/``format_version`` are added, ``data_sha256`` computed.
        path: destination; its folder must exist.

    Raises:
        CheckpointError: the file cannot be written (the previous file, if any, is left intact).
    """
    path = Path(path)
    data = serialize(tensors, meta)
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise CheckpointError(f"cannot write ({exc.strerror or exc})", path) from None


def _parse_header(raw: bytes, size: int, path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Validate the 8-byte length + JSON header; return (header, metadata, header length)."""
    if size < 8 or len(raw) < 8:
        raise CheckpointError("not a safetensors file (empty or shorter than 8 bytes)", path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n < 2:
        raise CheckpointError(f"not a safetensors file (header length {n})", path)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"not a safetensors file of quantsr (a {n:,}-byte header; ours stay below "
                              f"{MAX_HEADER_BYTES:,})", path)
    if 8 + n > size or len(raw) < 8 + n:
        raise CheckpointError("truncated file (header runs past the end)", path)
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError("not a safetensors file (header is not JSON)", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (header is not a JSON object)", path)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError("not a quantsr file (no string metadata)", path)
    big = next((k for k, v in meta.items() if len(v) > MAX_META_VALUE), None)
    if big is not None:
        raise CheckpointError(f"metadata {big[:40]!r} is {len(meta[big]):,} characters, more than a quantsr file "
                              f"ever holds ({MAX_META_VALUE:,})", path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"not a quantsr file (format={meta.get('format')!r})", path)
    version = meta.get("format_version", "")
    if not version.isdigit() or not version.isascii() or len(version) > 6:
        raise FormatVersionError(f"unknown format_version {version!r}", path)
    if int(version) > FORMAT_VERSION:
        raise FormatVersionError(
            f"written by a newer quantsr (format_version {version} > {FORMAT_VERSION}); upgrade quantsr", path
        )
    if int(version) < 1:
        raise FormatVersionError(f"unknown format_version {version!r}", path)
    return header, meta, n


def _open_bytes(path: Path, limit: int | None = None) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if limit is None:
                return f.read(), size
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                head += f.read(min(n, MAX_HEADER_BYTES, max(size - 8, 0)))
            return head, size
    except IsADirectoryError:
        raise CheckpointError("is a folder, not a model file", path) from None
    except FileNotFoundError:
        raise CheckpointError("file not found", path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read ({exc.strerror or exc})", path) from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """Read and validate only the header of a quantsr file; return its metadata strings.

    Raises:
        CheckpointError: missing/unreadable file, not safetensors, not quantsr, truncated header.
        FormatVersionError: unknown or newer ``format_version``.
    """
    path = Path(path)
    raw, size = _open_bytes(path, limit=MAX_HEADER_BYTES)
    return dict(_parse_header(raw, size, path)[1])


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a whole quantsr file: ``(tensors, metadata)`` (CPU tensors, dtypes as stored).

    Raises:
        CheckpointError: unreadable, corrupt (safetensors error or checksum mismatch) or truncated.
        FormatVersionError: unknown or newer ``format_version``.
    """
    path = Path(path)
    raw, size = _open_bytes(path)
    _, meta, n = _parse_header(raw, size, path)
    expected = meta.get("data_sha256")
    if expected is not None and hashlib.sha256(memoryview(raw)[8 + n:]).hexdigest() != expected:
        raise CheckpointError("corrupt file (data checksum mismatch; truncated or modified)", path)
    try:
        tensors = _st_load(raw)
    except Exception as exc:  # safetensors raises SafetensorError, ValueError, ... on malformed input
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"corrupt or truncated safetensors data ({first})", path) from None
    return tensors, dict(meta)


def save_model(
    model: nn.Module,
    path: str | Path,
    config: Any = None,
    extra: dict[str, Any] | None = None,
    pack: bool = False,
) -> dict[str, str]:
    """Save a model from ``quantsr_cli.models`` (FP, QAT or packed) and return the metadata written.

    Args:
        model: the model; its kind is detected (packed modules -> ``packed``, QAT layers -> ``qat``).
        path: destination ``.safetensors``.
        config: the ``QuantConfig`` used (method/bits metadata), optional.
        extra: free JSON-able information stored under ``extra``.
        pack: pack a QAT model before saving (kind ``packed``).
    """
    from quantsr_cli.packing.convert import quantized_layers

    if any(isinstance(m, PackedModule) for m in model.modules()):
        kind = "packed"
    elif quantized_layers(model):
        kind = "packed" if pack else "qat"
    else:
        kind = "fp"
    if kind == "packed":
        tensors, meta = pack_model(model, config, extra)
    else:
        tensors, meta = state_tensors(model), model_metadata(model, kind, config, extra)
    save_file(tensors, meta, path)
    return meta


def _build_base(meta: dict[str, str], path: Path, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The FP model the metadata describes; with ``tensors``, only once they back it (:mod:`.checks`)."""
    from quantsr_cli.models import build_model

    try:
        hparams = json.loads(meta.get("hparams", "{}"))
    except (ValueError, RecursionError):
        raise CheckpointError("metadata 'hparams' is not valid JSON", path) from None
    arch = meta.get("arch", "")
    if not isinstance(hparams, dict) or not arch:
        raise CheckpointError("metadata lacks 'arch' or has non-object 'hparams'", path)
    try:
        probe = on_meta(lambda: build_model(arch, **hparams))
    except (QuantSRError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build {arch!r} from its metadata ({exc})", path) from None
    if tensors is not None:
        packed = None
        if meta.get("kind") == "packed":
            packed = {e["name"]: e for e in decode_layers(meta, path) if isinstance(e.get("name"), str)}
        check_backed(probe, tensors, path, packed)
    del probe
    try:
        return build_model(arch, **hparams)
    except (QuantSRError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot build {arch!r} from its metadata ({exc})", path) from None


def load_model_file(path: str | Path) -> nn.Module:
    """Load a quantsr model file into a ready model (eval mode, on CPU), dispatching on ``kind``.

    Before anything is built, NaN/Inf tensors are refused and the metadata's architecture is checked
    against the tensors (built on the meta device first, see :mod:`quantsr_cli.packing.checks`).

    ``packed``: ``build_model`` + packed modules (reference ``impl``; pick a backend with
    ``quantsr_cli.backends.use_backend``); ``qat``: ``build_model`` + ``quant.quantize_`` with the
    file's ``QuantConfig`` + strict load; ``fp``: ``build_model`` + strict load.

    Raises:
        CheckpointError: any unreadable, inconsistent or non-model file (FormatVersionError for
            newer versions).
    """
    path = Path(path)
    tensors, meta = read_file(path)
    kind = meta.get("kind")
    if kind not in KINDS:
        raise CheckpointError(f"holds {kind!r} data, not a model (kind must be one of {', '.join(KINDS)})", path)
    check_finite(tensors, path)
    model = _build_base(meta, path, tensors)
    if kind == "packed":
        model = build_packed_model(model, tensors, meta, path)
        try:  # what to_qat and a re-export read; a packed file's forward does not depend on it
            model.quant_config = _quant_config(meta, path)
        except CheckpointError:
            model.quant_config = None
        return model
    if kind == "qat":
        from quantsr_cli.quant import quantize_

        model = quantize_(model, _quant_config(meta, path))
    load_tensors_strict(model, tensors, path)
    restore_skips(model, meta, path)
    return model.eval()


def _quant_config(meta: dict[str, str], path: Path | None) -> Any:
    """The ``QuantConfig`` of a qat/packed file's metadata, its method registered (CheckpointError otherwise)."""
    from quantsr_cli.config import QuantConfig
    from quantsr_cli.quant import method_spec

    try:
        config = QuantConfig(method=meta.get("method", ""), w_bits=int(meta.get("w_bits", "")),
                             a_bits=int(meta.get("a_bits", "")), layers=decode_layer_bits(meta, path))
        method_spec(config.method)
        return config
    except (QuantSRError, ValueError) as exc:
        raise CheckpointError(f"bad quantization metadata ({exc})", path) from None


def _count(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path | None) -> tuple[int, int, int]:
    """(quantized elements, expected bytes, parameter elements) of a file's content."""
    packed = meta.get("kind") == "packed"  # other kinds may carry a free-form ``layers`` summary
    layers = {e["name"]: e for e in decode_layers(meta, path)} if packed else {}
    quantized = params = 0
    expected = 0.0
    for key, t in tensors.items():
        name, _, leaf = key.rpartition(".")
        spec = layers.get(name)
        if spec is not None and leaf == "qweight":
            n = math.prod(int(s) for s in spec["shape"])
            quantized += n
            expected += n * int(spec["w_bits"]) / 8
            continue
        expected += t.numel() * t.element_size()
        if spec is None:
            params += t.numel()
        elif leaf == "qparams" and spec.get("bias"):
            params += int(spec["shape"][0])  # the layer's FP bias lives in its qparams
    return quantized, int(round(expected)), params


def size_report(source: str | Path | tuple[dict[str, torch.Tensor], dict[str, str]]) -> dict[str, Any]:
    """Size accounting of a packed (or any quantsr) file, for ``quantsr info``.

    Args:
        source: a file path, or ``(tensors, meta)`` as returned by :func:`pack_model` (then
            ``file_bytes`` is the size the file would have).

    Returns:
        ``params`` (weights/biases/FP tensors, elements; quantizer steps/scales/shifts excluded),
        ``quantized_params`` (elements stored as codes), ``file_bytes``, ``fp32_bytes`` (``params * 4``),
        ``expected_bytes`` (codes at their bit-width + every other tensor at its dtype size, header
        excluded), ``overhead`` (``file_bytes / expected_bytes - 1``) and ``compression``
        (``fp32_bytes / file_bytes``).
    """
    path = None if isinstance(source, tuple) else Path(source)
    if path is None:
        tensors, meta = source  # type: ignore[misc]
        file_bytes = len(serialize(tensors, meta))
    else:
        tensors, meta = read_file(path)
        file_bytes = path.stat().st_size
    try:
        quantized, expected, params = _count(tensors, meta, path)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        raise CheckpointError("metadata 'layers' is not valid", path) from None
    params += quantized
    return {
        "params": params,
        "quantized_params": quantized,
        "file_bytes": file_bytes,
        "fp32_bytes": params * 4,
        "expected_bytes": expected,
        "overhead": file_bytes / max(expected, 1) - 1,
        "compression": params * 4 / max(file_bytes, 1),
    }

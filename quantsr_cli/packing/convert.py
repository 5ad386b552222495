"""In-memory conversions: QAT model -> packed model (+ tensors/metadata), and back from a file's content.

Files are read and written by :mod:`quantsr_cli.packing.io` (which re-exports these functions); this
module never touches the disk. Metadata values are strings (safetensors rule); JSON-valued keys are
``hparams``, ``layers``, ``layer_bits``, ``skip_blocks`` and ``extra``.
"""

from __future__ import annotations

import copy
import json
import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.fileio import dumps
from quantsr_cli.packing.layout import PackFormat
from quantsr_cli.packing.modules import PACKED_TYPES, PackedActQuant, PackedConv2d, PackedLinear, PackedModule

FORMAT = "quantsr"
FORMAT_VERSION = 1
KINDS = ("packed", "qat", "fp")


def is_qat_layer(module: nn.Module) -> bool:
    """True for a QAT conv/linear (has ``w_q``; packable when ``w_q.export`` exists, i.e. not W32)."""
    return isinstance(module, nn.Conv2d | nn.Linear) and hasattr(module, "w_q")


def is_act_point(module: nn.Module) -> bool:
    """True for a standalone activation quantizer (``export()`` but not a conv/linear)."""
    return not isinstance(module, nn.Conv2d | nn.Linear | PackedModule) and callable(getattr(module, "export", None))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """QAT conv/linear layers and activation points of ``model``, outermost first (children skipped)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prev + ".") for prev, _ in found):
            continue
        if name and (is_qat_layer(module) or is_act_point(module)):
            found.append((name, module))
    return found


def to_packed(qat_model: nn.Module) -> nn.Module:
    """A deep copy of ``qat_model`` with every QAT layer replaced by its packed module (eval mode).

    The returned model's forward equals the fake-quant forward of ``qat_model`` in eval mode
    (up to float32 summation order).
    """
    model = copy.deepcopy(qat_model).eval()
    for name, module in quantized_layers(model):
        if is_qat_layer(module) and not callable(getattr(module.w_q, "export", None)):
            raise ConfigError(f"layer {name} has full-precision weights (w_bits=32): save it as a QAT model instead")
        if isinstance(module, nn.Conv2d):
            new: nn.Module = PackedConv2d.from_qat(module)
        elif isinstance(module, nn.Linear):
            new = PackedLinear.from_qat(module)
        else:
            new = PackedActQuant.from_qat(module)
        _replace(model, name, new)
    return model


LAYER_FIELDS = (
    "name", "type", "format", "shape", "w_bits", "w_zero", "per_channel", "bias", "a_bits", "a_qmin", "a_qmax",
    "shift", "shift_dim", "stride", "padding", "dilation", "groups",
)
"""Columns of the metadata ``layers`` table (``null`` where a field does not apply, e.g. act points)."""


def packed_layer_specs(model: nn.Module) -> list[dict[str, Any]]:
    """One dict per packed module: ``name`` plus the module's ``spec()``."""
    return [{"name": n, **m.spec()} for n, m in model.named_modules() if isinstance(m, PackedModule)]


def encode_layers(specs: list[dict[str, Any]]) -> str:
    """Metadata ``layers`` as a compact JSON table ``{"fields": LAYER_FIELDS, "rows": [[...], ...]}``.

    A table (not a list of objects) keeps the header small: for a 64-channel W2 conv the per-layer
    metadata is ~100 bytes next to its 9 KiB of codes.
    """
    return _dumps({"fields": list(LAYER_FIELDS), "rows": [[spec.get(f) for f in LAYER_FIELDS] for spec in specs]})


def decode_layers(meta: dict[str, str], path: Path | str | None = None) -> list[dict[str, Any]]:
    """Inverse of :func:`encode_layers` (``null`` fields dropped); CheckpointError if malformed."""
    table = _json(meta, "layers", path)
    fields = table.get("fields") if isinstance(table, dict) else None
    rows = table.get("rows") if isinstance(table, dict) else None
    if not (isinstance(fields, list) and all(isinstance(f, str) for f in fields) and isinstance(rows, list)):
        raise CheckpointError("metadata 'layers' is not a {fields, rows} table", path)
    if not all(isinstance(r, list) and len(r) == len(fields) for r in rows):
        raise CheckpointError("metadata 'layers' has rows of the wrong length", path)
    return [{f: v for f, v in zip(fields, row) if v is not None} for row in rows]


def _dumps(value: Any) -> str:
    return dumps(value, separators=(",", ":"))  # valid JSON: non-finite numbers become null


def model_metadata(model: nn.Module, kind: str, config: Any = None, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Metadata strings describing ``model`` (see :mod:`quantsr_cli.packing.io` for the keys).

    ``method``, ``w_bits`` and ``a_bits`` are written once, from the quantization config: ``config``,
    else the ``quant_config`` that ``quant.quantize_`` (or a packed file's loader) attached to the model.
    They are never worked out from the layers or their codes; a packed layer whose bits disagree with
    the config is refused (:func:`check_layer_bits`).

    Args:
        model: a model from ``quantsr_cli.models.build_model`` (FP, QAT or packed).
        kind: ``"packed"``, ``"qat"`` or ``"fp"``.
        config: the ``QuantConfig`` (or anything with ``method``, ``w_bits``, ``a_bits``).
        extra: free JSON-able information (training command, slim history, ...).

    Raises:
        ConfigError: a packed layer whose bits are not the config's.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    hparams = dict(getattr(model, "hparams", {}) or {})
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "arch": str(getattr(model, "arch", "")),
        "hparams": _dumps(hparams),
        "scale": str(hparams.get("upscale", "")),
    }
    if config is None:
        config = getattr(model, "quant_config", None)
    rules = tuple(getattr(config, "layers", ()) or ()) if config is not None else ()
    if kind == "packed":
        layers = packed_layer_specs(model)
        meta["layers"] = encode_layers(layers)
        if config is not None:
            bad = check_layer_bits(layers, int(config.w_bits), int(config.a_bits), rules)
            if bad:
                raise ConfigError(f"{bad}, but the quantization config says W{config.w_bits}A{config.a_bits}"
                                  + (" with its per-layer rules" if rules else ""))
    if config is not None:
        meta.update(method=str(config.method), w_bits=str(config.w_bits), a_bits=str(config.a_bits))
        if rules:
            meta[LAYER_BITS_KEY] = _dumps([list(r) for r in rules])
    elif kind != "fp":
        meta["method"] = "unknown"
    if callable(getattr(model, "block_names", None)):
        skipped = [b for b in model.block_names() if getattr(model.get_submodule(b), "skip", False)]
        if skipped:
            meta["skip_blocks"] = _dumps(skipped)
    if extra:
        meta["extra"] = _dumps(extra)
    return meta


LAYER_BITS_KEY = "layer_bits"
"""Metadata key of the per-layer bit rules (``QuantConfig.layers``): JSON ``[[pattern, w_bits, a_bits], ...]``."""


def check_layer_bits(layers: list[dict[str, Any]], w_bits: int, a_bits: int,
                     rules: tuple[tuple[str, int, int], ...] = ()) -> str | None:
    """The first packed layer (metadata ``layers`` rows) whose bits are not the config's, described in
    words, or None when all agree. A layer's bits are ``w_bits``/``a_bits`` unless one of the per-layer
    ``rules`` (``(pattern, w, a)``, the last match wins) matches its name; a layer a rule keeps full
    precision must not be packed. Bits always come from the config, never from the codes."""
    for entry in layers:
        name = str(entry.get("name"))
        rule = next((r for r in reversed(rules) if fnmatchcase(name, r[0])), None)
        want_w, want_a = (rule[1], rule[2]) if rule is not None else (w_bits, a_bits)
        w, a = entry.get("w_bits"), entry.get("a_bits")
        if rule is not None and want_w == want_a == 32:
            return f"layer {name} is packed, but its rule {rule[0]!r} keeps it full precision"
        if entry.get("type") != "act" and w != want_w:
            return f"layer {name} holds {w}-bit weight codes"
        if a != want_a:
            return f"layer {name} quantizes its input at {a} bits"
    return None


def decode_layer_bits(meta: dict[str, str], path: Path | str | None = None) -> tuple[tuple[str, int, int], ...]:
    """The per-layer bit rules a file's metadata records (``()`` when it has none); CheckpointError if malformed."""
    if LAYER_BITS_KEY not in meta:
        return ()
    rules = _json(meta, LAYER_BITS_KEY, path)
    ok = isinstance(rules, list) and len(rules) <= 256 and all(
        isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and 0 < len(r[0]) <= 200
        and all(type(b) is int and b in (2, 4, 8, 32) for b in r[1:]) for r in rules)
    if not ok:
        raise CheckpointError(f"metadata {LAYER_BITS_KEY!r} is not a list of [pattern, w_bits, a_bits] rules", path)
    return tuple((r[0], r[1], r[2]) for r in rules)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` detached, on CPU, contiguous (ready to be saved)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def pack_model(qat_model: nn.Module, config: Any = None, extra: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pack a QAT model (or take an already packed one): ``(tensors, meta)`` ready for ``io.save_file``.

    Each packed layer is stored as ``<name>.qweight`` (uint8 packed codes, absent for activation
    points) and ``<name>.qparams``: float32, the concatenation ``[w_scale (1 or O), a_step (1),
    a_shift (0 or C_in), bias (0 or O)]`` of its float side data (one tensor instead of four keeps
    the header small; see :func:`merge_side_tensors`). Full-precision tensors keep their own keys,
    in float32.
    """
    packed = qat_model if any(isinstance(m, PackedModule) for m in qat_model.modules()) else to_packed(qat_model)
    return merge_side_tensors(packed, state_tensors(packed)), model_metadata(packed, "packed", config, extra)


SIDE_KEY = "qparams"


def merge_side_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each packed module's side buffers in ``tensors`` (a state dict) by ``<name>.qparams``."""
    out = dict(tensors)
    for name, module in model.named_modules():
        if isinstance(module, PackedModule):
            parts = [out.pop(f"{name}.{b}").reshape(-1).to(torch.float32) for b, _ in module.side_buffers()]
            out[f"{name}.{SIDE_KEY}"] = torch.cat(parts)
    return out


def split_side_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path | str | None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`merge_side_tensors` for ``model``'s packed modules; CheckpointError on mismatch."""
    out = dict(tensors)
    for name, module in model.named_modules():
        if not isinstance(module, PackedModule):
            continue
        key = f"{name}.{SIDE_KEY}"
        if key not in out:
            raise CheckpointError(f"missing tensors {key}", path)
        blob = out.pop(key)
        side = module.side_buffers()
        sizes = [buf.numel() for _, buf in side]
        if blob.dtype != torch.float32 or blob.dim() != 1 or blob.numel() != sum(sizes):
            raise CheckpointError(f"tensor {key} is {blob.dtype} {list(blob.shape)}, the model needs float32 [{sum(sizes)}]", path)
        for (b, buf), part in zip(side, blob.split(sizes)):
            out[f"{name}.{b}"] = part.reshape(buf.shape).clone()
    return out


def _json(meta: dict[str, str], key: str, path: Path | str | None, default: Any = None) -> Any:
    if key not in meta:
        if default is not None:
            return default
        raise CheckpointError(f"metadata has no {key!r}", path)
    try:
        return json.loads(meta[key])
    except ValueError:
        raise CheckpointError(f"metadata {key!r} is not valid JSON", path) from None


def _int(entry: dict[str, Any], key: str, allowed: tuple[int, ...] | None = None) -> int:
    value = entry[key]
    if not isinstance(value, int) or isinstance(value, bool) or (allowed and value not in allowed):
        raise ValueError(f"{key}={value!r}")
    return value


def _check_spec(entry: Any, base: nn.Module) -> dict[str, Any]:
    """Validate one ``layers`` entry against the FP module it replaces; raise ValueError if wrong."""
    if not isinstance(entry, dict) or entry.get("type") not in PACKED_TYPES:
        raise ValueError("entry is not a packed layer description")
    a_bits = _int(entry, "a_bits", (2, 4, 8, 32))
    qmin, qmax = _int(entry, "a_qmin"), _int(entry, "a_qmax")
    if a_bits < 32 and not (-(1 << (a_bits - 1)) <= qmin < qmax <= (1 << a_bits) - 1):
        raise ValueError(f"code range [{qmin}, {qmax}] does not fit {a_bits} bits")
    shift = _int(entry, "shift")
    if entry["type"] == "act":
        if shift < 0 or shift > 1 << 20 or not isinstance(entry.get("shift_dim", -1), int):
            raise ValueError("bad shift")
        return entry
    expected = nn.Conv2d if entry["type"] == "conv2d" else nn.Linear
    if not isinstance(base, expected):
        raise ValueError(f"the model has a {type(base).__name__} here, not a {entry['type']}")
    if [int(s) for s in entry["shape"]] != list(base.weight.shape):
        raise ValueError(f"weight shape {entry['shape']} != model's {list(base.weight.shape)}")
    w_bits = _int(entry, "w_bits", (2, 4, 8))
    if entry["format"] != PackFormat.for_bits(w_bits).value:
        raise ValueError(f"format {entry['format']!r} does not store {w_bits}-bit codes")
    if not isinstance(entry["w_zero"], int | float) or not math.isfinite(entry["w_zero"]):
        raise ValueError(f"w_zero={entry['w_zero']!r}")
    if shift not in (0, base.weight.shape[1] * getattr(base, "groups", 1)):
        raise ValueError(f"shift has {shift} channels")
    if bool(entry["bias"]) != (base.bias is not None) or not isinstance(entry["per_channel"], bool):
        raise ValueError("bias/per_channel flags do not match")
    if entry["type"] == "conv2d":
        geometry = {"stride": list(base.stride), "dilation": list(base.dilation), "groups": base.groups,
                    "padding": base.padding if isinstance(base.padding, str) else list(base.padding)}
        for key, value in geometry.items():
            if entry.get(key) != value:
                raise ValueError(f"{key}={entry.get(key)!r} but the model's conv has {value!r}")
    return entry


def _check_file_bits(layers: list[dict[str, Any]], meta: dict[str, str], path: Path | str | None) -> None:
    """CheckpointError when the file's ``w_bits``/``a_bits`` (written once, from the config) are malformed
    or a layer's codes are stored at other bits (the layer's own ``format``/``w_bits`` and the size of its
    ``qweight`` are checked against each other when the layer is built)."""
    if "w_bits" not in meta and "a_bits" not in meta:
        return  # written without a quantization config: the layers are all there is
    bits = []
    for key in ("w_bits", "a_bits"):
        value = meta.get(key, "")
        if not (value.isascii() and value.isdigit() and int(value) in (2, 4, 8, 32)):
            raise CheckpointError(f"metadata {key} {value[:20]!r} is not one of 2, 4, 8, 32", path)
        bits.append(int(value))
    rules = decode_layer_bits(meta, path)
    bad = check_layer_bits(layers, bits[0], bits[1], rules)
    if bad:
        extra = f" and {len(rules)} per-layer rules" if rules else ""
        raise CheckpointError(f"{bad}, but the file's metadata says w_bits={bits[0]}, a_bits={bits[1]}{extra}", path)


def load_tensors_strict(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path | str | None) -> None:
    """Load ``tensors`` into ``model`` exactly: same keys, shapes and dtypes, else CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected tensors {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
        raise CheckpointError("; ".join(parts), path)
    for key, ref in own.items():
        got = tensors[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise CheckpointError(
                f"tensor {key} is {got.dtype} {list(got.shape)}, the model needs {ref.dtype} {list(ref.shape)}", path
            )
    try:
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"tensors do not fit the model ({str(exc).splitlines()[0][:200]})", path) from None


def restore_skips(model: nn.Module, meta: dict[str, str], path: Path | str | None) -> None:
    """Set ``skip = True`` on the blocks listed in metadata ``skip_blocks``."""
    names = _json(meta, "skip_blocks", path, default=[])
    blocks = set(model.block_names()) if callable(getattr(model, "block_names", None)) else set()
    if not isinstance(names, list) or not all(isinstance(n, str) and n in blocks for n in names):
        raise CheckpointError("metadata 'skip_blocks' names blocks this model does not have", path)
    for name in names:
        model.get_submodule(name).skip = True


def build_packed_model(
    base_model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path | str | None = None
) -> nn.Module:
    """Turn a freshly built FP model into the packed model stored in ``tensors``/``meta``.

    Args:
        base_model: ``build_model(meta['arch'], **hparams)``; modified in place and returned (eval mode).
        tensors: the file's tensors (packed codes, quantizer parameters, FP weights).
        meta: the file's metadata (``layers`` describes each packed module).
        path: the file, for error messages.

    Raises:
        CheckpointError: bad ``layers`` JSON, a layer that does not fit the model, missing/extra
            tensors, wrong shapes or dtypes, or non-finite/non-positive quantizer steps.
    """
    layers = decode_layers(meta, path)
    _check_file_bits(layers, meta, path)
    modules = dict(base_model.named_modules())
    seen: set[str] = set()
    for entry in layers:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or name not in modules or name in seen:
            raise CheckpointError(f"metadata 'layers' names an unknown or repeated layer {name!r}", path)
        seen.add(name)
        try:
            spec = _check_spec(entry, modules[name])
            new = PACKED_TYPES[spec["type"]](spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"layer {name}: {exc}", path) from None
        _replace(base_model, name, new)
    load_tensors_strict(base_model, split_side_tensors(base_model, tensors, path), path)
    for name, module in base_model.named_modules():
        if isinstance(module, PackedModule):
            bad_step = module.a_bits < 32 and not (bool(torch.isfinite(module.a_step).all()) and float(module.a_step) > 0)
            scale = getattr(module, "w_scale", None)
            if bad_step or (scale is not None and not bool(torch.isfinite(scale).all())):
                raise CheckpointError(f"layer {name} has a non-finite or non-positive quantizer step/scale", path)
    restore_skips(base_model, meta, path)
    return base_model.eval()

"""Presets and ``--config`` files: the only place quantsr reads YAML.

A preset is a flat YAML mapping of ``quantsr quantize`` options, e.g. ``presets/imdn_x4_w4a4.yaml``::

    arch: imdn
    scale: 4
    method: rbd
    bits: 4
    init: ${QUANTSR_DATA}/weights/IMDN_x4.pth
    iters: 4000

Keys are the option names of the training commands (with ``-`` or ``_``), plus ``layers``, the per-layer
bit rules (``{pattern: fp | 2 | 4 | 8 | w<b>a<b>}``, see :func:`quantsr_cli.config.parse_layer_bits`); an unknown or repeated key, a
value of the wrong type or a YAML tag such as ``!!python/object`` is a :class:`~quantsr_cli.errors.ConfigError`
naming the file and the key. ``--preset`` takes only the name of a bundled preset. Files are read with ``yaml.safe_load`` only. ``${QUANTSR_DATA}`` in string
values expands to the shared data folder (see :func:`expand_data_vars`).
"""

from __future__ import annotations

import math
import os
import reprlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from quantsr_cli.config import parse_layer_bits
from quantsr_cli.errors import ConfigError

# Element type of the list-valued keys.
LIST_ITEMS: dict[str, type] = {"milestones": int, "train_data": str}

# Every key a preset or --config file may set, with its expected Python type.
PRESET_KEYS: dict[str, type | tuple[type, ...]] = {
    "arch": str,
    "scale": int,
    "method": str,
    "bits": int,
    "w_bits": int,
    "a_bits": int,
    "act_sign": str,
    "share_qv_quantizer": bool,
    "blocks": int,
    "init": str,
    "iters": int,
    "batch_size": int,
    "patch_size": int,
    "lr": float,
    "scheduler": str,
    "milestones": list,
    "gamma": float,
    "val_every": int,
    "save_every": int,
    "log_every": int,
    "seed": int,
    "threads": int,
    "train_data": list,
    "val_dataset": str,
    "val_max_images": int,
    "dqa": bool,
    "slim_to": int,
    "slim_start_ratio": float,
    "distill": str,
    "feature_weight": float,
    "bias_correction": bool,
    "ema_decay": float,
    "drop_path_rate": float,
    "layers": dict,
    "description": str,
}


def preset_dir() -> Path:
    """Folder holding the bundled ``*.yaml`` presets (installed package data or the source tree)."""
    try:
        packaged = resources.files("quantsr_cli") / "preset_files"
        if packaged.is_dir():
            return Path(str(packaged))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    return Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    """Names (file stems) of the bundled presets, sorted."""
    folder = preset_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(name: str) -> dict[str, Any]:
    """Read the bundled preset ``name`` (file stem, e.g. ``"imdn_x4_w4a4"``).

    Only the names :func:`list_presets` returns are accepted: a path (or a name with ``/``, ``..`` or
    ``.yaml``) is refused, pointing to ``--config``, which is how option files are passed.
    """
    known = list_presets()
    if name not in known:
        if any(ch in name for ch in "/\\") or name.endswith((".yaml", ".yml")) or name.startswith("."):
            raise ConfigError(f"--preset takes a bundled preset name, not a path ({name!r}); "
                              "pass your own options file with --config FILE")
        raise ConfigError(f"unknown preset {name!r}: --preset takes a bundled preset name "
                          f"({', '.join(known) or 'none'}); your own options file goes to --config FILE")
    return load_config_file(preset_dir() / f"{name}.yaml")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a flat YAML options file; keys are normalised to ``snake_case``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or (f"not UTF-8 text ({exc.reason})" if isinstance(exc, UnicodeDecodeError) else exc)
        raise ConfigError(f"cannot read config file: {reason}", path) from None
    _check_duplicate_keys(text, path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"invalid YAML: {first}", path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of option: value at the top level", path)
    return validate_options(data, path)


def _check_duplicate_keys(text: str, path: Path) -> None:
    """ConfigError for a mapping that repeats a key (YAML 1.2 forbids it; PyYAML keeps the last one silently).

    Uses ``yaml.compose``: the node tree only, nothing is constructed. Aliased nodes are visited once,
    so alias bombs cost nothing here.
    """
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return  # safe_load reports the syntax error
    seen_nodes: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                stack += [key, value]
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                first = lines.setdefault((key.tag, key.value), line)
                if first != line:
                    raise ConfigError(f"duplicate key {key.value!r} (lines {first} and {line}); each option may "
                                      "appear once", path)
        elif isinstance(node, yaml.SequenceNode):
            stack += list(node.value)


def validate_options(data: dict[Any, Any], path: str | Path | None = None) -> dict[str, Any]:
    """Check keys and value types against :data:`PRESET_KEYS`; return a normalised copy."""
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in PRESET_KEYS:
            raise ConfigError(f"unknown key {raw_key!r} (known keys: {', '.join(sorted(PRESET_KEYS))})", path)
        expected = PRESET_KEYS[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "2e-4" as a string
            except ValueError:
                pass
        if expected is int and isinstance(value, bool) or not isinstance(value, expected):
            name = expected.__name__ if isinstance(expected, type) else str(expected)
            raise ConfigError(f"key {key!r} must be of type {name}, got {type(value).__name__} {_short(value)}", path)
        if expected is float and not math.isfinite(value):
            raise ConfigError(f"key {key!r} must be a finite number, got {value!r}", path)
        item = LIST_ITEMS.get(key)
        if item is not None and not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"key {key!r} must be a list of {item.__name__}, got {_short(value)}", path)
        if isinstance(value, str):
            value = expand_data_vars(value)
        if key == "layers":
            try:
                parse_layer_bits(value)
            except ConfigError as exc:
                raise ConfigError(str(exc), path) from None
        out[key] = value
    return out


def _short(value: Any) -> str:
    """A bounded repr (YAML aliases can nest a value exponentially: a full repr would never end)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 60, 60
    text = short.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def expand_data_vars(value: str) -> str:
    """Expand ``${QUANTSR_DATA}`` (default ``../shared/data``) and ``~`` in a string option."""
    if "${QUANTSR_DATA}" in value or "$QUANTSR_DATA" in value:
        data = os.environ.get("QUANTSR_DATA", "../shared/data")
        value = value.replace("${QUANTSR_DATA}", data).replace("$QUANTSR_DATA", data)
    return os.path.expanduser(value)

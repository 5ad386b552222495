"""Presets and ``--config`` files: the only place quantsr reads YAML.

A preset is a flat YAML mapping of ``quantsr quantize`` options, e.g. ``presets/imdn_x4_w4a4.yaml``::

    arch: imdn
    scale: 4
    method: rbd
    bits: 4
    init: ${QUANTSR_DATA}/weights/IMDN_x4.pth
    iters: 4000

Keys are the training options declared in :mod:`quantsr_cli.config` (with ``-`` or ``_``), plus
``description``; an unknown or repeated key, a value of the wrong type or out of bounds, ``nan``/``inf``, or a
YAML tag such as ``!!python/object`` is a :class:`~quantsr_cli.errors.ConfigError` naming the file and the key. ``--preset`` takes only the name of a bundled preset. Files are read with ``yaml.safe_load`` only. ``${QUANTSR_DATA}`` in string
values expands to the data folder (see :func:`expand_data_vars`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from quantsr_cli.config import training_options
from quantsr_cli.errors import ConfigError
from quantsr_cli.options import Declared, check_value, coerce, short
from quantsr_cli.paths import data_dir

DESCRIPTION = "description"
"""The one key that is not an option: a preset's one-line description (ignored when training)."""


def file_options() -> dict[str, Declared]:
    """The options a preset or ``--config`` file may set, by key (derived from the config dataclasses)."""
    return {d.name: d for d in training_options() if d.option.files}


def preset_keys() -> list[str]:
    """Every key a preset or ``--config`` file may hold, sorted."""
    return sorted([*file_options(), DESCRIPTION])


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


def describe_presets() -> list[tuple[str, str]]:
    """``(name, description)`` of every bundled preset, sorted by name (each file is read and checked)."""
    return [(name, str(load_preset(name).get(DESCRIPTION, ""))) for name in list_presets()]


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
    """Check keys, types and bounds against the declared options; return a normalised copy.

    Keys may use ``-`` or ``_``; list values become tuples, ints become floats where the option is a float,
    ``${QUANTSR_DATA}`` is expanded in strings. Any problem is a ConfigError naming ``path`` and the key.
    """
    known = file_options()
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        try:
            if key == DESCRIPTION:
                if not isinstance(value, str):
                    raise ConfigError(f"key {key!r} must be of type str, got {type(value).__name__} {short(value)}")
                out[key] = value
                continue
            decl = known.get(key)
            if decl is None:
                raise ConfigError(f"unknown key {raw_key!r} (known keys: {', '.join(preset_keys())})")
            value = coerce(decl, value)
            check_value(key, value, decl.option)
        except ConfigError as exc:
            raise ConfigError(str(exc), path) from None
        if isinstance(value, str):
            value = expand_data_vars(value)
        elif isinstance(value, tuple) and decl.item is str:
            value = tuple(expand_data_vars(v) for v in value)
        out[key] = value
    return out


def expand_data_vars(value: str) -> str:
    """Expand ``${QUANTSR_DATA}`` (the data folder, :func:`quantsr_cli.paths.data_dir`) and ``~`` in a string."""
    if "${QUANTSR_DATA}" in value or "$QUANTSR_DATA" in value:
        data = str(data_dir())
        value = value.replace("${QUANTSR_DATA}", data).replace("$QUANTSR_DATA", data)
    return os.path.expanduser(value)

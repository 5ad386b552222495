"""Option precedence: command line > ``--config`` file > preset > the dataclass defaults.

Each source is a :class:`Layer` of checked values keyed by option name. :func:`resolve` stacks them,
auto-selects the bundled preset ``<arch>_x<scale>_w<b>a<b>`` when none is named and it exists, and returns a
:class:`Resolved` that builds the typed configs (``ModelConfig``/``QuantConfig``/``TrainConfig``) and knows
where every value came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quantsr_cli.config import training_options
from quantsr_cli.errors import ConfigError
from quantsr_cli.options import Declared, coerce, declared
from quantsr_cli.presets import DESCRIPTION, list_presets, load_config_file, load_preset

T = TypeVar("T")

DEFAULT = "default"
"""The source of a value no layer sets."""


def _options() -> dict[str, Declared]:
    return {d.name: d for d in training_options()}


@dataclass(frozen=True)
class Layer:
    """Option values from one source (``"flag"``, ``"--config FILE"``, ``"preset NAME"``, ``"--model FILE"``).

    Build it with :meth:`of`, which checks every name and type against the declarations.
    """

    source: str
    values: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, source: str, values: Mapping[str, Any]) -> Layer:
        """A checked layer; ``None`` values mean "not given" and are dropped; lists become tuples."""
        known = _options()
        out = {}
        for name, value in values.items():
            if value is None or name == DESCRIPTION:
                continue
            decl = known.get(name)
            if decl is None:
                raise ConfigError(f"{source}: unknown option {name!r}")
            out[name] = coerce(decl, value)
        return cls(source, out)

    def expanded(self) -> dict[str, Any]:
        """The values with each alias (``bits``) replaced by what it sets, unless this layer sets those itself."""
        out = {k: v for k, v in self.values.items() if not _options()[k].sets}
        for name, value in self.values.items():
            for target in _options()[name].sets:
                out.setdefault(target, value)
        return out


@dataclass(frozen=True)
class Resolved:
    """The merged options: ``values`` by name (aliases expanded), ``sources`` by name, the preset used."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    preset: str | None = None

    def kwargs(self, cls: type) -> dict[str, Any]:
        """Keyword arguments of config class ``cls`` that some layer set (the rest keep their defaults)."""
        return {d.name: self.values[d.name] for d in declared(cls) if d.name in self.values}

    def build(self, cls: type[T]) -> T:
        """An instance of config class ``cls`` from the resolved values (it validates itself)."""
        return cls(**self.kwargs(cls))

    def source(self, name: str) -> str:
        """Where option ``name`` came from (``"default"`` when no layer set it)."""
        return self.sources.get(name, DEFAULT)

    def table(self) -> list[tuple[str, Any, str]]:
        """``(name, value, source)`` for every option, defaults included, in declaration order."""
        rows = []
        for decl in training_options():
            if decl.sets:
                continue
            value = self.values.get(decl.name, None if decl.required else decl.default)
            rows.append((decl.name, value, self.source(decl.name)))
        return rows


def merge(layers: Sequence[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    """Values and sources of ``layers`` (highest precedence first)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in reversed(layers):
        for name, value in layer.expanded().items():
            values[name], sources[name] = value, layer.source
    return values, sources


def auto_preset(values: Mapping[str, Any]) -> str | None:
    """The bundled preset ``<arch>_x<scale>_w<w_bits>a<a_bits>`` for these values, if it exists."""
    arch, scale = values.get("arch"), values.get("scale", 4)
    wb, ab = values.get("w_bits"), values.get("a_bits")
    candidate = f"{arch}_x{scale}_w{wb}a{ab}"
    return candidate if arch and wb and candidate in list_presets() else None


def resolve(command_line: Sequence[Layer], config: Path | None = None, preset: str | None = None) -> Resolved:
    """Stack ``command_line`` layers (highest first) over the ``--config`` file, the preset and the defaults.

    With no ``preset`` named, the bundled one matching the command line and config file is used when it
    exists (see :func:`auto_preset`).
    """
    layers = list(command_line)
    if config is not None:
        layers.append(Layer.of(f"--config {config}", load_config_file(config)))
    if preset is None:
        preset = auto_preset(merge(layers)[0])
    if preset:
        layers.append(Layer.of(f"preset {preset}", load_preset(preset)))
    values, sources = merge(layers)
    return Resolved(values, sources, preset)

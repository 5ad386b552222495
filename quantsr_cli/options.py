"""Training options, each declared once: a config dataclass field made with :func:`option`.

A field of :class:`~quantsr_cli.config.ModelConfig`, :class:`~quantsr_cli.config.QuantConfig` or
:class:`~quantsr_cli.config.TrainConfig` declared as ``name: type = option(default, help, ...)`` is an
option. Everything else is derived from that one declaration:

- preset and ``--config`` file keys, with the field's type, bounds and ``nan``/``inf`` refused
  (:func:`quantsr_cli.presets.validate_options`);
- the flags of ``quantize``/``slim``/``distill``, whose help shows the field's real default
  (:mod:`quantsr_cli.cli.trainopts`);
- the precedence flag > ``--config`` file > preset > default and the typed configs built from it
  (:mod:`quantsr_cli.presets.resolve`);
- the bound checks of the dataclass itself (:func:`check_fields`, called by ``__post_init__``).

Plain fields (no :func:`option`) are settings of the code that no file or flag sets (e.g. Adam's betas).
"""

from __future__ import annotations

import functools
import math
import reprlib
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from quantsr_cli.errors import ConfigError

TRAINING_COMMANDS = ("quantize", "slim", "distill")
"""The commands that train (and so take training option flags)."""


@dataclass(frozen=True)
class Option:
    """How an option is checked and shown: the ``metadata["option"]`` of its dataclass field.

    Attributes:
        help: one sentence for ``--help`` and the docs. No square brackets (rich markup would eat them)
            and no default: the field's real default is printed next to it.
        commands: commands that have a flag for it; ``()`` = preset and ``--config`` files only.
        flags: per command, a flag name that differs from ``--<name-with-dashes>``.
        short: a one-letter alias (``-a``) wherever the flag exists.
        required: commands on which the flag must be given.
        files: whether presets and ``--config`` files may set it.
        ge, gt, le, lt: numeric bounds; hint: appended to a bound error (e.g. ``(0 = off)``).
        choices: the allowed values; allowed: how an error names them (default: from ``choices``).
        shown: the ``[default: ...]`` text when the default is empty or ``None`` (e.g. where data comes from).
        panel: the ``--help`` panel the flag is listed in.
        parse: for a structured value no flag type holds (e.g. the per-layer bit rules mapping): the
            function that checks a file's value and returns the field's value (ConfigError when bad).
    """

    help: str
    commands: tuple[str, ...] = TRAINING_COMMANDS
    flags: tuple[tuple[str, str], ...] = ()
    short: str | None = None
    required: tuple[str, ...] = ()
    files: bool = True
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    hint: str = ""
    choices: tuple[Any, ...] = ()
    allowed: str = ""
    shown: str = ""
    panel: str = "Training"
    parse: Callable[[Any], Any] | None = None

    def flag(self, name: str, command: str) -> str:
        """The long flag of option ``name`` on ``command``."""
        return dict(self.flags).get(command, "--" + name.replace("_", "-"))


def option(default: Any = MISSING, help: str = "", **how: Any) -> Any:  # noqa: A002 - the word users see
    """A dataclass field that is a training option (see :class:`Option` for ``how``).

    ``flags`` may be given as a dict (``{"slim": "--target-blocks"}``). A mutable default is not allowed:
    list-valued options are tuples.
    """
    if "flags" in how and isinstance(how["flags"], dict):
        how["flags"] = tuple(how["flags"].items())
    return field(default=default, metadata={"option": Option(help=help, **how)})


@dataclass(frozen=True)
class Declared:
    """One option as the rest of the code sees it: name, Python type, default and :class:`Option`.

    ``kind`` is the value type (``int``, ``float``, ``str``, ``bool`` or ``tuple``); ``item`` the element
    type of a tuple option; ``optional`` whether ``None`` is its default (not set). ``owner`` is the
    config class holding the field (``None`` for an alias such as ``bits``, which sets ``sets``).
    """

    name: str
    kind: type
    default: Any
    option: Option
    owner: type | None = None
    item: type | None = None
    optional: bool = False
    sets: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """True when the field has no default: some layer must set it."""
        return self.default is MISSING


@functools.cache
def declared(cls: type) -> tuple[Declared, ...]:
    """The options of config class ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            out.append(describe(f.name, hints[f.name], f.default, opt, owner=cls))
    return tuple(out)


def describe(name: str, annotation: Any, default: Any, opt: Option, *, owner: type | None = None,
             sets: tuple[str, ...] = ()) -> Declared:
    """A :class:`Declared` from a type annotation (``int``, ``str | None``, ``tuple[int, ...]`` ...); an option
    with its own ``parse`` is of kind ``object`` (files only)."""
    if opt.parse is not None:
        if opt.commands:
            raise TypeError(f"option {name}: a parsed option has no flag (commands=())")
        return Declared(name, object, default, opt, owner, sets=sets)
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"option {name}: unsupported type {annotation}")
        annotation, optional = rest[0], True
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"option {name}: only tuple[T, ...] is supported, not {annotation}")
        return Declared(name, tuple, default, opt, owner, item=args[0], optional=optional, sets=sets)
    if annotation not in (int, float, str, bool):
        raise TypeError(f"option {name}: unsupported type {annotation}")
    return Declared(name, annotation, default, opt, owner, optional=optional, sets=sets)


def coerce(decl: Declared, value: Any) -> Any:
    """``value`` as the option's type (ints for floats, lists as tuples), or a ConfigError naming the key.

    YAML 1.1 reads ``2e-4`` as a string, so a float option also accepts a string that parses as one.
    ``nan`` and ``inf`` are refused for every float.
    """
    if decl.option.parse is not None:
        try:
            return decl.option.parse(value)
        except ConfigError as exc:
            raise ConfigError(f"key {decl.name!r}: {exc}") from None
    kind = decl.kind
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"key {decl.name!r} must be of type list, got {type(value).__name__} {short(value)}")
        item: type = decl.item or object
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"key {decl.name!r} must be a list of {item.__name__}, got {short(value)}")
        return tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"key {decl.name!r} must be of type {kind.__name__}, got {type(value).__name__} "
                          f"{short(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"key {decl.name!r} must be a finite number, got {value!r}")
    return value


def check_value(name: str, value: Any, opt: Option) -> None:
    """ConfigError ``"<name>=<value> must be ..."`` when ``value`` is outside the option's bounds or choices."""
    if value is None:
        return
    if opt.choices and value not in opt.choices:
        allowed = opt.allowed or _either(opt.choices)
        raise ConfigError(f"{name}={value!r} is not supported; choose {allowed}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low_ok = (opt.ge is None or value >= opt.ge) and (opt.gt is None or value > opt.gt)
    high_ok = (opt.le is None or value <= opt.le) and (opt.lt is None or value < opt.lt)
    if low_ok and high_ok:
        return
    hint = f" {opt.hint}" if opt.hint else ""
    raise ConfigError(f"{name}={value!r} must {bounds_text(opt)}{hint}")


def bounds_text(opt: Option) -> str:
    """What the bounds ask, after "must": ``"be at least 1"``, ``"be positive"``, ``"not be negative"``,
    ``"be in [0, 1)"`` (empty when unbounded)."""
    low = opt.ge if opt.ge is not None else opt.gt
    high = opt.le if opt.le is not None else opt.lt
    if low is not None and high is not None:
        left, right = "[" if opt.ge is not None else "(", "]" if opt.le is not None else ")"
        return f"be in {left}{_num(low)}, {_num(high)}{right}"
    if opt.gt == 0:
        return "be positive"
    if opt.ge == 0:
        return "not be negative"
    if low is not None:
        return f"be at least {_num(low)}" if opt.ge is not None else f"be greater than {_num(low)}"
    if high is not None:
        return f"be at most {_num(high)}" if opt.le is not None else f"be less than {_num(high)}"
    return ""


def check_fields(config: Any) -> None:
    """Check every option field of the dataclass instance ``config`` (for ``__post_init__``)."""
    for decl in declared(type(config)):
        check_value(decl.name, getattr(config, decl.name), decl.option)


def short(value: Any) -> str:
    """A bounded repr (YAML aliases can nest a value exponentially: a full repr would never end)."""
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxlist, brief.maxdict, brief.maxstring, brief.maxother = 2, 4, 4, 60, 60
    text = brief.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _either(choices: tuple[Any, ...]) -> str:
    words = [str(c) for c in choices]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]

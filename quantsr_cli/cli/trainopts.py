"""The flags of the training commands (``quantize``, ``slim``, ``distill``), derived from the declarations.

:func:`training_command` adds one Typer option per training option that names the command (see
:mod:`quantsr_cli.options`): its type, flag name, help and shown default all come from the config field.
The command receives the flags the user actually typed as a checked
:class:`~quantsr_cli.presets.resolve.Layer` (a flag left at its default is not "given", so a ``--config``
file or preset value is not overridden by it). The remaining aliases are the per-run options.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from quantsr_cli.cli.common import finite, print_json
from quantsr_cli.config import training_options
from quantsr_cli.models import ARCHS
from quantsr_cli.quant import METHODS, method_names
from quantsr_cli.options import Declared
from quantsr_cli.presets.resolve import Layer, Resolved

Preset = Annotated[str | None, typer.Option(
    "--preset", help="Bundled preset name.", show_default="<arch>_x<scale>_w<b>a<b> when it exists")]
Config = Annotated[Path | None, typer.Option(
    "--config", help="YAML file of options (overridden by flags).", show_default="none")]
RunDir = Annotated[Path | None, typer.Option(
    "--run-dir", help="Run folder.", show_default="runs/<arch>_x<scale>_w<b>a<b>")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.",
                                      show_default="off: a folder with checkpoints is refused")]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Packed model file to write.", show_default="<run-dir>/model.safetensors")]
PrintConfig = Annotated[bool, typer.Option(
    "--print-config", help="Print every training option with its value and where it came from (flag, --config, "
    "preset, --model or default), then exit without training.", show_default="off")]
StartModel = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model to continue from: a qat file, or a packed "
    f"{'/'.join(method_names(fine_tunable=True))} file or bundled name (fine-tuned from its codes).",
    show_default="none")]


def options_for(command: str) -> list[Declared]:
    """The declared options that have a flag on ``command``, in declaration order."""
    return [d for d in training_options() if command in d.option.commands]


def typer_parameter(decl: Declared, command: str) -> inspect.Parameter:
    """The Typer parameter of option ``decl`` on ``command`` (help and default from the declaration)."""
    opt = decl.option
    flag = opt.flag(decl.name, command)
    required = command in opt.required
    kind: Any = list[decl.item] if decl.kind is tuple else decl.kind  # type: ignore[name-defined]
    decls = [f"{flag}/--no-{flag[2:]}" if decl.kind is bool else flag]
    if opt.short:
        decls.append(opt.short)
    default: Any = ... if required else (None if decl.optional or decl.required or decl.kind is tuple
                                          else decl.default)
    info = typer.Option(
        *decls,
        help=opt.help.replace("{archs}", ", ".join(ARCHS)).replace("{methods}", ", ".join(METHODS)),
        show_default=False if required else (opt.shown or default is not None),
        callback=finite if decl.kind is float else None,
        rich_help_panel=opt.panel,
    )
    annotation = Annotated[kind if required or default is not None else kind | None, info]
    return inspect.Parameter(decl.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def given(ctx: typer.Context, name: str) -> bool:
    """True when the user set parameter ``name`` (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def training_command(command: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a command whose first parameter is ``flags: Layer``: add the derived option flags.

    The command's own parameters (run folder, device ...) follow the derived ones in ``--help``.
    """

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        if not own or own[0].name != "flags":
            raise TypeError(f"{func.__name__}: the first parameter must be 'flags: Layer'")
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[1:]]
        derived = [typer_parameter(d, command) for d in options_for(command)]
        names = [p.name for p in derived]
        clash = set(names) & {p.name for p in own} | ({"ctx"} & {p.name for p in own})
        if clash:
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} clash with declared options")
        ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        params = [ctx_param, *derived, *own]

        @functools.wraps(func)
        def command_function(ctx: typer.Context, **kwargs: Any) -> None:
            flags = {name: kwargs.pop(name) for name in names}
            return func(Layer.of("flag", {n: v for n, v in flags.items() if given(ctx, n)}), **kwargs)

        del command_function.__wrapped__  # Typer must read the signature below, not the wrapped one
        command_function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command_function.__annotations__ = {p.name: p.annotation for p in params}
        return command_function

    return decorate


def _shown(decl: Declared, value: Any) -> str:
    if value is None or value == () or value == "":
        return decl.option.shown or "none"
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def print_resolved(opts: Resolved, command: str, run_dir: Path, json_out: bool) -> None:
    """``--print-config``: each option's value and source on stdout (``--json``: one object)."""
    decls = {d.name: d for d in training_options()}
    rows = opts.table()
    if json_out:
        print_json({"command": command, "preset": opts.preset, "run_dir": str(run_dir),
                    "options": {name: {"value": value, "source": source} for name, value, source in rows}})
        return
    typer.echo(f"{command}: preset {opts.preset or 'none'}, run directory {run_dir}")
    width = max(len(name) for name, _, _ in rows)
    shown = [(name, _shown(decls[name], value), source) for name, value, source in rows]
    vwidth = min(max(len(v) for _, v, _ in shown), 48)
    for name, value, source in shown:
        typer.echo(f"  {name:<{width}}  {value:<{vwidth}}  {source}")

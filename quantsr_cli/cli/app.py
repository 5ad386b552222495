"""The ``quantsr`` application: registers every command and turns errors into one-line messages.

Exit codes:

* 0 ok;
* 1 a user, data or environment error: a :class:`~quantsr_cli.errors.QuantSRError` (bad option, file,
  image, dataset, unusable backend), a file-system error naming its file, or running out of memory;
  one line on stderr;
* 2 a usage error (Typer's own: unknown option, bad option type);
* 3 an internal error: any other exception is a bug in quantsr, reported in one line that says so
  (``QUANTSR_DEBUG=1`` prints the traceback, for every error kind);
* 130 interrupted.

To add a command: write ``cli/<name>.py`` (a function whose parameters are the Typer options and whose
work is one call into ``engine``, and its ``EXAMPLES`` for ``--help``) and add it to the registration
tuple below (one line).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import torch
import typer

from quantsr_cli import __version__
from quantsr_cli.cli import data as data_cmd
from quantsr_cli.cli import diffusion as diffusion_cmd
from quantsr_cli.cli import distill as distill_cmd
from quantsr_cli.cli import eval as eval_cmd
from quantsr_cli.cli import export as export_cmd
from quantsr_cli.cli import info as info_cmd
from quantsr_cli.cli import pack as pack_cmd
from quantsr_cli.cli import presets as presets_cmd
from quantsr_cli.cli import quantize as quantize_cmd
from quantsr_cli.cli import slim as slim_cmd
from quantsr_cli.cli import upscale as upscale_cmd
from quantsr_cli.cli.common import err_console
from quantsr_cli.errors import QuantSRError
from quantsr_cli.quant import METHODS

EXIT_ERROR = 1
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="quantsr",
    help="Quantize super-resolution networks to 2/4 bits, evaluate them and upscale images with them packed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_line() -> str:
    """``quantsr --version``: this package's version and the torch build it runs on."""
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return f"quantsr {__version__} (torch {torch.__version__}, {cuda}, python {sys.version.split()[0]})"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the versions of quantsr and torch and exit.",
                                          callback=_print_version, is_eager=True, show_default="off")] = False,
) -> None:
    pass


def _first_doc_line(func: object) -> str:
    return (getattr(func, "__doc__", None) or "").strip().split("\n")[0]


# One line per command: name, function, help (None: the first docstring line), --help examples.
for _name, _func, _help, _examples in (
    ("upscale", upscale_cmd.upscale, None, upscale_cmd.EXAMPLES),
    ("eval", eval_cmd.evaluate, "PSNR/SSIM (Y channel, BasicSR conventions) on Set5/Set14/B100/Urban100/Manga109.",
     eval_cmd.EXAMPLES),
    ("quantize", quantize_cmd.quantize, f"Quantization-aware training ({', '.join(METHODS)}) at W/A 2, 4 or 8 bits.",
     quantize_cmd.EXAMPLES),
    ("slim", slim_cmd.slim, None, slim_cmd.EXAMPLES),
    ("distill", distill_cmd.distill, None, distill_cmd.EXAMPLES),
    ("pack", pack_cmd.pack, None, pack_cmd.EXAMPLES),
    ("info", info_cmd.info, None, info_cmd.EXAMPLES),
    ("export", export_cmd.export, None, export_cmd.EXAMPLES),
    ("presets", presets_cmd.presets, None, presets_cmd.EXAMPLES),
):
    app.command(_name, help=_help or _first_doc_line(_func), epilog=_examples)(_func)
app.add_typer(diffusion_cmd.app, name="diffusion")
app.add_typer(data_cmd.app, name="data")


def _say(message: str) -> None:
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _environment_error(exc: BaseException) -> str | None:
    """The one-line message of an error the user's machine caused (not a bug), else None."""
    if isinstance(exc, OSError) and exc.filename:  # disk full, permission denied, ...: name the file
        return f"{exc.filename}: {exc.strerror or _first_line(exc)}"
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return f"out of memory ({_first_line(exc)}); use a smaller --tile, --batch-size or --patch-size"
    return None


def main() -> None:
    """Console entry point: runs the app and maps every outcome to an exit code (module docstring)."""
    debug = os.environ.get("QUANTSR_DEBUG", "") not in ("", "0")
    try:
        app()
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exc:
        if exc.code == EXIT_INTERRUPTED:  # Typer turns Ctrl-C inside a command into a silent exit 130
            _say("interrupted")
        raise
    except QuantSRError as exc:
        if debug:
            traceback.print_exc()
        _say(f"error: {exc}")
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - the one place where unexpected errors are reported
        if debug:
            traceback.print_exc()
        known = _environment_error(exc)
        if known is not None:
            _say(f"error: {known}")
            sys.exit(EXIT_ERROR)
        _say(f"internal error (a bug in quantsr): {type(exc).__name__}: {_first_line(exc)}; "
             "run again with QUANTSR_DEBUG=1 for the traceback and report it")
        sys.exit(EXIT_INTERNAL)

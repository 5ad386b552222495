"""The ``quantsr`` application: registers every command and turns errors into one-line messages.

Exit codes: 0 ok, 1 user or data error (one line on stderr; ``QUANTSR_DEBUG=1`` adds the traceback),
2 usage error (Typer's own), 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

from quantsr_cli.cli import eval as eval_cmd
from quantsr_cli.cli import quantize as quantize_cmd
from quantsr_cli.cli.common import err_console
from quantsr_cli.errors import QuantSRError

app = typer.Typer(
    name="quantsr",
    help="Quantize super-resolution networks to 2/4 bits, evaluate them and upscale images with them packed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize", help="Quantization-aware training (RBD, RLQ, LSQ, DoReFa, PAMS) at W/A 2, 4 or 8 bits.")(
    quantize_cmd.quantize
)
app.command("eval", help="PSNR/SSIM (Y channel, BasicSR conventions) on Set5/Set14/B100/Urban100/Manga109.")(
    eval_cmd.evaluate
)


def _not_built(name: str, issue: str) -> None:
    def command() -> None:
        err_console.print(f"quantsr {name}: not available in this version yet ({issue})")
        raise typer.Exit(2)

    command.__doc__ = f"(not available yet: {issue})"
    app.command(name, help=f"Not available yet: {issue}.")(command)


def _register_optional() -> None:
    """Commands whose modules may not exist yet in this version."""
    import importlib

    for name, module, func, issue in (
        ("upscale", "upscale", "upscale", "packed upscaling"),
        ("slim", "slim", "slim", "QSA block removal"),
        ("distill", "distill", "distill", "SFD distillation"),
        ("pack", "pack", "pack", "packed model format"),
        ("info", "info", "info", "model report"),
        ("export", "export", "export", "ONNX / OpenVINO export"),
    ):
        try:
            mod = importlib.import_module(f"quantsr_cli.cli.{module}")
        except ModuleNotFoundError:
            _not_built(name, issue)
            continue
        app.command(name, help=(getattr(mod, func).__doc__ or "").split("\n")[0])(getattr(mod, func))


_register_optional()


def _register_diffusion() -> None:
    from quantsr_cli.cli import diffusion as diffusion_cmd

    app.add_typer(diffusion_cmd.app, name="diffusion")


_register_diffusion()


def main() -> None:
    """Console entry point."""
    debug = os.environ.get("QUANTSR_DEBUG", "") not in ("", "0")
    try:
        app()
    except QuantSRError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted", highlight=False)
        sys.exit(130)
    except (OSError, ValueError, RuntimeError, FloatingPointError) as exc:
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        err_console.print(f"error: {first}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)

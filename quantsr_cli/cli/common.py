"""Shared option aliases, the stderr console and the progress renderer of the commands."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from quantsr_cli.backends import AUTO, BACKENDS
from quantsr_cli.fileio import dumps

err_console = Console(stderr=True)
"""Logs, progress bars and errors go to stderr; results go to stdout."""

def _device(value: str) -> str:
    from quantsr_cli.engine.devices import check_device

    return check_device(value)


DeviceOpt = Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda or cuda:N.", callback=_device)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object to stdout.", show_default="off")]
ScaleOpt = Annotated[int | None, typer.Option("--scale", "-s", help="Upscaling factor (2, 3 or 4).", min=2, max=4,
                                              show_default="the model's")]


def _backend_help() -> str:
    ranked = sorted((s for s in BACKENDS.values() if s.auto_rank is not None), key=lambda s: s.auto_rank or 0)
    names = "; ".join(f"{n}: {s.summary}" for n, s in BACKENDS.items())
    return f"Packed models: {AUTO} (the first available of {', '.join(s.name for s in ranked)}) or one of: {names}."


BackendOpt = Annotated[str, typer.Option("--backend", help=_backend_help())]
"""The one ``--backend`` option of every command that runs a model (default ``auto``)."""
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Data folder, or a folder holding benchmark dataset folders.",
                 show_default="$QUANTSR_DATA, else the per-user data folder"),
]


def examples(*commands: str) -> str:
    """The epilog of a command's ``--help``: its example command lines (no ``[``: rich markup eats it)."""
    return "Examples:\n" + "\n".join(f"  {c}" for c in commands)


def print_json(obj: Any) -> None:
    """Write ``obj`` as valid JSON to stdout (NaN/Infinity become ``null``)."""
    sys.stdout.write(dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    """A log line on stderr (never wrapped: one message, one line)."""
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)


def finite(value: float | None, param: typer.CallbackParam) -> float | None:
    """Option callback: refuse ``nan``/``inf``/``-inf`` for a numeric option (a usage error naming it)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number", param=param)
    return value


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich progress bar on stderr (disabled: a Progress that draws nothing)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        yield progress


class TrainRenderer:
    """Turns trainer events into a progress bar with loss, PSNR and it/s, and log lines."""

    def __init__(self, progress: Progress, total: int, description: str, plain_every: int = 50) -> None:
        self.progress = progress
        self.task = progress.add_task(description, total=total, info="")
        self.psnr = "–"
        self.plain_every = plain_every

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "train":
            info = f"loss {event['loss']:.4f}  val {self.psnr}  {event['it_s']:.2f} it/s"
            self.progress.update(self.task, completed=event["iter"], info=info)
            if not self.progress.console.is_terminal and event["iter"] % self.plain_every == 0:
                # no live bar in a log file: one plain line now and then
                self.progress.console.print(f"iter {event['iter']}/{event['iters']}  {info}", highlight=False)
        elif kind == "val":
            self.psnr = f"{event['psnr']:.2f} dB"
            mark = " (best)" if event.get("improved") else ""
            self.progress.console.print(f"iter {event['iter']}: val PSNR {event['psnr']:.3f} dB{mark}", highlight=False)
        elif kind == "resume":
            self.progress.update(self.task, completed=event["iter"])
            self.progress.console.print(f"resumed from {event['path']} at iteration {event['iter']}", highlight=False,
                                        markup=False, soft_wrap=True)
        elif kind in ("log", "slim"):
            self.progress.console.print(event.get("message", str(event)), highlight=False, markup=False,
                                        soft_wrap=True)

"""Shared option aliases, the stderr console and the progress renderer of the commands."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


class LazyProgress:
    """A rich :class:`Progress` that draws nothing until its first ``update``: a command that fails before
    any work (bad option, missing file or dataset) prints its one error line and no progress bar."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = False

    @property
    def console(self) -> Console:
        return self.progress.console

    def add_task(self, description: str, **kwargs: Any) -> TaskID:
        return self.progress.add_task(description, **kwargs)

    def update(self, task: TaskID, **kwargs: Any) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        self.progress.update(task, **kwargs)

    def stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[LazyProgress]:
    """A rich progress bar on stderr, shown from its first update (disabled: a Progress that draws nothing)."""
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
    lazy = LazyProgress(progress)
    try:
        yield lazy
    finally:
        lazy.stop()


def clock(seconds: float | None) -> str:
    """``h:mm:ss`` of a duration, ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class TrainRenderer:
    """Turns trainer events into phase lines and, once training starts, one progress bar.

    Before the ``training`` phase only log lines are printed (``loading data: T91, BSD200``,
    ``calibrating: 16 patches``), so an error in that time is not preceded by a bar. The bar moves every
    iteration and shows the loss, the latest validation PSNR (refreshed as soon as it is known), it/s and
    the time left at the measured rate (``eta``); during validation it says so.
    """

    def __init__(self, description: str, enabled: bool = True, plain_every: int = 50,
                 console: Console | None = None) -> None:
        self.description = description
        self.plain_every = plain_every
        self.progress = LazyProgress(Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
            console=console or err_console, disable=not enabled, transient=False,
        ))
        self.task: TaskID | None = None
        self.psnr = "–"
        self.last: dict[str, Any] = {}

    @property
    def console(self) -> Console:
        return self.progress.console

    def _say(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def info(self, activity: str = "") -> str:
        """The bar's text: loss, validation PSNR, it/s (or what the run is doing instead)."""
        last = self.last
        loss = f"loss {last['loss']:.4f}" if last.get("loss") is not None else "loss –"
        rate = f"{last['it_s']:.2f} it/s" if last.get("it_s") else "– it/s"
        return f"{loss}  val {self.psnr}  {activity or rate}"

    def _show(self, activity: str = "") -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.last.get("iter", 0), info=self.info(activity),
                                 eta=clock(self.last.get("eta_s")))

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "phase":
            self._phase(event)
        elif kind == "step":
            self.last = event
            self._show()
            self._timed(event)
        elif kind == "train":
            self.last = {**self.last, **event}
            if not self.console.is_terminal and event["iter"] % self.plain_every == 0:
                # no live bar in a log file: one plain line now and then
                self._say(f"iter {event['iter']}/{event['iters']}  {self.info()}  eta {clock(event.get('eta_s'))}")
        elif kind == "val":
            self.psnr = f"{event['psnr']:.2f} dB"
            self._show()
            mark = " (best)" if event.get("improved") else ""
            self._say(f"iter {event['iter']}: val PSNR {event['psnr']:.3f} dB{mark}")
        elif kind == "resume":
            self._say(f"resumed from {event['path']} at iteration {event['iter']}")
        elif kind in ("log", "slim"):
            self._say(str(event.get("message", event)))

    TIMED_ITERS = 5
    """Iterations timed before the one line that says how long the run will take."""

    def _timed(self, event: dict[str, Any]) -> None:
        it, total, eta = event.get("iter", 0), event.get("iters", 0), event.get("eta_s")
        if getattr(self, "told_eta", False) or eta is None or not it < total or it < min(self.TIMED_ITERS, total - 1):
            return
        self.told_eta = True
        self._say(f"timing: {event['it_s']:.2f} it/s over the first {it} iterations; the {total} iterations take "
                  f"about {clock(eta)} more (h:mm:ss, validation and checkpoints not included)")

    def _phase(self, event: dict[str, Any]) -> None:
        name, message = event["phase"], event.get("message", "")
        if name == "training":
            self.last = {"iter": event["iter"]}
            if self.task is None:
                self.task = self.progress.add_task(self.description, total=event["iters"], completed=event["iter"],
                                                   info="", eta=clock(None))
            self._show("starting")
        elif name == "validating" and self.task is not None:
            self._show("validating")
        else:
            if name == "packing":
                self.close()
            self._say(f"{name}: {message}" if message else f"{name} ...")

    def close(self) -> None:
        """Stop the bar (leaving its last state on screen); further events only print lines."""
        self.progress.stop()

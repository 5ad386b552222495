"""Option aliases shared by the training commands (``quantize``, ``slim``, ``distill``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import finite
from quantsr_cli.quant import method_names

Iters = Annotated[int | None, typer.Option("--iters", help="Training iterations.")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Patches per iteration.")]
PatchSize = Annotated[int | None, typer.Option("--patch-size", help="HR patch side in pixels.")]
Lr = Annotated[float | None, typer.Option("--lr", help="Adam learning rate [default: 2e-4].", callback=finite)]
ValEvery = Annotated[int | None, typer.Option("--val-every", help="Validate every N iterations (0 = never).")]
SaveEvery = Annotated[int | None, typer.Option("--save-every", help="Write a resumable checkpoint every N iterations.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
Threads = Annotated[int | None, typer.Option("--threads", help="Torch CPU threads (0 = torch default).")]
TrainData = Annotated[list[str] | None, typer.Option("--train-data", help="HR image folder; repeatable [default: $QUANTSR_DATA/train/*].")]
ValDataset = Annotated[str | None, typer.Option("--val-dataset", help="Validation benchmark [default: Set5].")]
Preset = Annotated[str | None, typer.Option("--preset", help="Bundled preset name (auto: <arch>_x<scale>_w<b>a<b>).")]
Config = Annotated[Path | None, typer.Option("--config", help="YAML file of options (overridden by flags).")]
RunDir = Annotated[Path | None, typer.Option("--run-dir", help="Run folder [default: runs/<arch>_x<scale>_w<b>a<b>].")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Packed model file to write [default: <run-dir>/model.safetensors].")]
StartModel = Annotated[str | None, typer.Option("--model", "-m", help=f"Model to continue from: a qat file, or a packed {'/'.join(method_names(fine_tunable=True))} file or bundled name (fine-tuned from its codes).")]

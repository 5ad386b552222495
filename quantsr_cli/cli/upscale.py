"""``quantsr upscale``: upscale images or folders with a packed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import DeviceOpt, JsonOpt, err_console, print_json, progress_bar
from quantsr_cli.data.io import MAX_PIXELS
from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.runtime import select_backend
from quantsr_cli.engine.upscale import UpscaleOptions, run_upscale


def upscale(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (one input) or folder.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model file or bundled name.")] = "default",
    tile: Annotated[int, typer.Option("--tile", "-t", help="LR tile size in pixels (0 = whole image).")] = 256,
    tile_pad: Annotated[int, typer.Option("--tile-pad", help="LR context pixels around each tile.")] = 16,
    backend: Annotated[str, typer.Option("--backend", help="auto, torch, cpu, cupy (packed models), openvino or onnxruntime.")] = "auto",
    suffix: Annotated[str, typer.Option("--suffix", help="Appended to each output file's stem (folder output).")] = "",
    ext: Annotated[str, typer.Option("--ext", help="Output format: auto (as the input), png, jpg, webp, tif.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite/--skip-existing", help="Replace or keep existing outputs.")] = True,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Refuse inputs with more pixels (width x height) than this; 0 = no limit.")] = MAX_PIXELS,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Upscale images or folders with a (packed) SR model; the bundled default needs no flags."""
    opts = UpscaleOptions(tile=tile, tile_pad=tile_pad, suffix=suffix, ext=ext, overwrite=overwrite,
                          max_pixels=max_pixels)
    loaded = load_model(model, device=device)
    used = select_backend(loaded, backend, device)
    err_console.print(f"model: {loaded.label}, backend: {used}", highlight=False)
    with progress_bar() as progress:
        task = progress.add_task("upscale", total=None, info="")

        def on_event(event: dict) -> None:
            progress.update(task, completed=event["index"], total=event["total"], info=Path(event["src"]).name)

        report = run_upscale(loaded, inputs, str(output), opts, on_event=on_event)
    for message in report.failed.values():
        err_console.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    if json_out:
        print_json(report.to_dict())
    else:
        for path in report.written:
            typer.echo(path)
    if report.failed:
        raise typer.Exit(1)

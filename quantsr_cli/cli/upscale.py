"""``quantsr upscale``: upscale images or folders with a packed model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from quantsr_cli.cli.common import (
    BackendOpt,
    DeviceOpt,
    JsonOpt,
    err_console,
    examples,
    finite,
    print_json,
    progress_bar,
)
from quantsr_cli.data.io import MAX_PIXELS
from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.runtime import select_backend
from quantsr_cli.engine.upscale import UpscaleOptions, plan_upscale, run_upscale

EXAMPLES = examples("quantsr upscale photo.jpg -o photo_x4.png",
                    "quantsr upscale photos/ -o out/ --outscale 2 --ext webp --quality 90")


def upscale(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (one input) or folder.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model file or bundled name; a .onnx/.xml from quantsr export runs in its runtime.")] = "default",
    tile: Annotated[int, typer.Option("--tile", "-t", help="LR tile size in pixels (0 = whole image).")] = 256,
    tile_pad: Annotated[int, typer.Option("--tile-pad", help="LR context pixels around each tile.")] = 16,
    backend: BackendOpt = "auto",
    suffix: Annotated[str, typer.Option("--suffix", help="Appended to each output file's stem (folder output).", show_default="none")] = "",
    ext: Annotated[str, typer.Option("--ext", help="Output format: auto (as the input), png, jpg, webp, tif.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite/--skip-existing", help="Replace or keep existing outputs.")] = True,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Refuse inputs, or outputs (input pixels x scale²), with more pixels (width x height) than this; checked from the file header; 0 = no limit.")] = MAX_PIXELS,
    outscale: Annotated[float | None, typer.Option("--outscale", help="Final scale of the written images (e.g. 3 with an x4 model); the model output is resized with Lanczos.", callback=finite, show_default="the model's scale")] = None,
    alpha_upsampler: Annotated[str, typer.Option("--alpha-upsampler", help="Alpha channels: bicubic, or model (run the SR model on the alpha).")] = "bicubic",
    quality: Annotated[int, typer.Option("--quality", help="JPEG / WebP quality (100: lossless WebP).", min=0, max=100)] = 95,
    half: Annotated[bool, typer.Option("--half", help="GPU engine (--backend cupy) with float16 glue: faster, slightly less exact.", show_default="off")] = False,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads (0 = torch's default).", min=0)] = 0,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Upscale images or folders with a (packed) SR model; the bundled default needs no flags."""
    opts = UpscaleOptions(tile=tile, tile_pad=tile_pad, suffix=suffix, ext=ext, overwrite=overwrite,
                          max_pixels=max_pixels, outscale=outscale, alpha_upsampler=alpha_upsampler, quality=quality)
    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(model, device=device, allow_exported=True)
    if loaded.detected:
        err_console.print(loaded.detected, highlight=False, markup=False, soft_wrap=True)
    plan = plan_upscale(loaded, inputs, str(output), opts)  # paths and image headers, before any backend work
    if plan.runnable:
        used = select_backend(loaded, backend, device, half=half)
        err_console.print(f"model: {loaded.label}, backend: {used}{' (float16)' if half else ''}", highlight=False)
    with progress_bar() as progress:
        task = progress.add_task("upscale", total=None, info="")

        def on_event(event: dict) -> None:
            info = Path(event["src"]).name
            if event["event"] == "tile":
                info += f" (tile {event['tile']}/{event['tiles']})"
                progress.update(task, completed=event["index"], total=event["total"], info=info)
            else:
                progress.update(task, completed=event["index"], total=event["total"], info=info)

        report = run_upscale(loaded, inputs, str(output), opts, on_event=on_event, plan=plan)
    for message in report.warnings:
        err_console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)
    for message in report.failed.values():
        err_console.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    if json_out:
        print_json(report.to_dict())
    else:
        for path in report.written:
            typer.echo(path)
    if report.failed:
        raise typer.Exit(1)

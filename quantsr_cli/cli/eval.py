"""``quantsr eval``: PSNR/SSIM of a model on benchmark datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quantsr_cli.cli.common import (
    BackendOpt,
    DataRootOpt,
    DeviceOpt,
    JsonOpt,
    ScaleOpt,
    err_console,
    examples,
    print_json,
    progress_bar,
)
from quantsr_cli.engine.compare import write_comparisons
from quantsr_cli.engine.evaluate import check_eval_outputs, run_eval
from quantsr_cli.engine.modelio import load_model, set_depth
from quantsr_cli.engine.runtime import select_backend
from quantsr_cli.errors import ConfigError

EXAMPLES = examples("quantsr eval --dataset Set5 --dataset Set14          # the bundled default model",
                    "quantsr eval --weights IMDN_x4.pth --dataset Set5 --json")


def evaluate(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model file or bundled name (default, default-w2); a .onnx/.xml from quantsr export runs in its runtime.", show_default="default")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Architecture of --weights.", show_default="detected from the weights")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="Foreign full-precision weights (.pth/.pt/.ckpt/.safetensors, instead of --model); the architecture is detected.", show_default="none")] = None,
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="Set5, Set14, B100, Urban100, Manga109 or a folder; repeatable.", show_default="Set5")] = None,
    scale: ScaleOpt = None,
    data_root: DataRootOpt = None,
    json_out: JsonOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Per-image rows.", show_default="off")] = False,
    save_dir: Annotated[Path | None, typer.Option("--save-dir", help="Write SR images here.", show_default="none")] = None,
    tile: Annotated[int, typer.Option("--tile", help="LR tile size for large images (0 = whole image).", min=0)] = 0,
    compare_dir: Annotated[Path | None, typer.Option("--compare-dir", help="Write side-by-side zoomed crops (HR, bicubic, models) here.", show_default="none")] = None,
    compare_model: Annotated[list[str] | None, typer.Option("--compare-model", help="Another model for --compare-dir panels; repeatable.", show_default="none")] = None,
    backend: BackendOpt = "auto",
    depth: Annotated[str | None, typer.Option("--depth", help="DQA models: full, half or quarter depth.", show_default="full")] = None,
    device: DeviceOpt = "cpu",
) -> None:
    """Evaluate PSNR/SSIM (Y channel, BasicSR conventions) on benchmark datasets."""
    if model is not None and weights is not None:
        raise ConfigError("pass either --model or --weights, not both")
    source = str(weights) if weights is not None else (model or "default")
    loaded = load_model(source, arch=arch, scale=scale, device=device, allow_exported=True)
    if loaded.detected:
        err_console.print(loaded.detected, highlight=False, markup=False, soft_wrap=True)
    if depth is not None:
        set_depth(loaded, depth)
    select_backend(loaded, backend, device)
    datasets = dataset or ["Set5"]
    check_eval_outputs([source, *(compare_model or [])], datasets, scale=loaded.scale,
                       data_root=str(data_root) if data_root else None, save_dir=save_dir, compare_dir=compare_dir)
    with progress_bar(enabled=not json_out or err_console.is_terminal) as progress:
        task = progress.add_task("eval", total=None, info="")

        def on_event(event: dict) -> None:
            progress.update(task, description=f"{event['dataset']}", completed=event["index"],
                            total=event["total"], info=f"{event['name']} {event['psnr']:.2f} dB")

        result = run_eval(loaded, datasets, data_root=str(data_root) if data_root else None, tile=tile,
                          save_dir=str(save_dir) if save_dir else None, on_event=on_event)
    if compare_dir is not None:
        others = [load_model(m, scale=loaded.scale, device=device, allow_exported=True) for m in (compare_model or [])]
        for name in datasets:
            write_comparisons([*others, loaded], name, compare_dir,
                              data_root=str(data_root) if data_root else None)
    if json_out:
        print_json(result)
        return
    table = Table(title=f"{loaded.label} — x{loaded.scale}, Y-channel PSNR (dB) / SSIM, {loaded.scale}px border")
    table.add_column("dataset")
    table.add_column("model PSNR", justify="right")
    table.add_column("SSIM", justify="right")
    table.add_column("bicubic PSNR", justify="right")
    table.add_column("SSIM", justify="right")
    for name, res in result["datasets"].items():
        bic = res.get("bicubic", {})
        table.add_row(name, f"{res['psnr']:.2f}", f"{res['ssim']:.4f}",
                      f"{bic.get('psnr', float('nan')):.2f}", f"{bic.get('ssim', float('nan')):.4f}")
        if verbose:
            for image, vals in res["images"].items():
                table.add_row(f"  {image}", f"{vals['psnr']:.2f}", f"{vals['ssim']:.4f}", "", "")
    from rich.console import Console

    Console().print(table)

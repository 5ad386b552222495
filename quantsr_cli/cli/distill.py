"""``quantsr distill``: QuantSR+ SFD, feature distillation from a full-precision teacher."""

from __future__ import annotations

from typing import Annotated

import typer

from quantsr_cli.cli import trainopts as T
from quantsr_cli.cli.common import DeviceOpt, JsonOpt, finite
from quantsr_cli.cli.quantize import run_training_command
from quantsr_cli.quant import method_names


def distill(
    model: Annotated[str, typer.Option("--model", "-m", help=f"Student: a quantized model (qat file, or a packed {'/'.join(method_names(fine_tunable=True))} file or bundled name).")],
    teacher: Annotated[str, typer.Option("--teacher", help="Full-precision teacher (.pth or safetensors).")],
    feature_weight: Annotated[float, typer.Option("--feature-weight", help="Weight of the feature loss.", callback=finite)] = 1e-4,
    iters: T.Iters = None, batch_size: T.BatchSize = None, patch_size: T.PatchSize = None, lr: T.Lr = None,
    val_every: T.ValEvery = None, save_every: T.SaveEvery = None, seed: T.Seed = None, threads: T.Threads = None,
    train_data: T.TrainData = None, val_dataset: T.ValDataset = None, preset: T.Preset = None,
    config: T.Config = None, run_dir: T.RunDir = None, resume: T.Resume = False, out: T.Out = None,
    device: DeviceOpt = "cpu", json_out: JsonOpt = False,
) -> None:
    """SFD: fine-tune a quantized student with L1 + feature distillation from an FP teacher."""
    cli = dict(distill=teacher, feature_weight=feature_weight, iters=iters, batch_size=batch_size,
               patch_size=patch_size, lr=lr, val_every=val_every, save_every=save_every, seed=seed, threads=threads,
               train_data=train_data or None, val_dataset=val_dataset)
    run_training_command(cli, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model)

"""``quantsr slim``: QuantSR+ QSA, removing residual blocks during quantization-aware training."""

from __future__ import annotations

from typing import Annotated

import typer

from quantsr_cli.cli import trainopts as T
from quantsr_cli.cli.common import DeviceOpt, JsonOpt, finite
from quantsr_cli.cli.quantize import run_training_command
from quantsr_cli.errors import ConfigError


def slim(
    target_blocks: Annotated[int, typer.Option("--target-blocks", help="Blocks to keep (e.g. 32 -> 16, 8 -> 4 RSTBs).")],
    model: T.StartModel = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Start a fresh quantized model of this arch instead of --model.")] = None,
    bits: Annotated[int | None, typer.Option("--bits", help="Bits for a fresh --arch model.")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="Starting blocks for a fresh --arch model.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="FP weights for a fresh --arch model.")] = None,
    start_ratio: Annotated[float, typer.Option("--start-ratio", help="First removal at this fraction of --iters.", callback=finite)] = 0.2,
    iters: T.Iters = None, batch_size: T.BatchSize = None, patch_size: T.PatchSize = None, lr: T.Lr = None,
    val_every: T.ValEvery = None, save_every: T.SaveEvery = None, seed: T.Seed = None, threads: T.Threads = None,
    train_data: T.TrainData = None, val_dataset: T.ValDataset = None, preset: T.Preset = None,
    config: T.Config = None, run_dir: T.RunDir = None, resume: T.Resume = False, out: T.Out = None,
    device: DeviceOpt = "cpu", json_out: JsonOpt = False,
) -> None:
    """QSA: train a quantized model while removing residual blocks until --target-blocks remain."""
    if (model is None) == (arch is None):
        raise ConfigError("give either --model QAT_FILE or --arch NAME")
    if target_blocks < 1:
        raise ConfigError(f"--target-blocks {target_blocks} must be at least 1")
    cli = dict(arch=arch, bits=bits, blocks=blocks, init=init, slim_to=target_blocks, slim_start_ratio=start_ratio,
               iters=iters, batch_size=batch_size, patch_size=patch_size, lr=lr, val_every=val_every,
               save_every=save_every, seed=seed, threads=threads, train_data=train_data or None,
               val_dataset=val_dataset)
    run_training_command(cli, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model)

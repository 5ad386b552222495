"""``quantsr diffusion``: QArtSR for one-step diffusion SR (train, quantize, sweep)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import JsonOpt, examples, log, print_json
from quantsr_cli.engine import diffusion as engine

app = typer.Typer(help="QArtSR: low-bit one-step diffusion SR (TRQ + RPQ + ET) on osd-sr-tiny or OSEDiff.",
                  no_args_is_help=True)

TrainData = Annotated[list[str] | None, typer.Option("--train-data", help="HR image folder; repeatable.",
                                                     show_default="$QUANTSR_DATA/train/T91 and BSD200")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Patches per step.", min=1)]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
Patches = Annotated[int, typer.Option("--calib-patches", help="Calibration patches (64 px HR) from the training "
                                      "folders.", min=1)]
TRAIN_EXAMPLES = examples("quantsr diffusion train --run-dir runs/osd_tiny",
                          "quantsr diffusion train --run-dir runs/osd_tiny --iters 5000 --threads 2   # resumes")
QUANTIZE_EXAMPLES = examples(
    "quantsr diffusion quantize -m runs/osd_tiny/osd_sr_tiny_x4.safetensors -o osd_w4.safetensors",
    "quantsr diffusion quantize -m runs/osd_tiny/osd_sr_tiny_x4.safetensors -o osd_w2.safetensors --bits 2 "
    "--stages trq,rpq,et --trq-timestep 499")
SWEEP_EXAMPLES = examples("quantsr diffusion sweep -m runs/osd_tiny/osd_sr_tiny_x4.safetensors",
                          "quantsr diffusion sweep -m runs/osd_tiny/osd_sr_tiny_x4.safetensors -t 999 -t 499 --json")


def _log(event: dict) -> None:
    log(" ".join(f"{k}={v}" for k, v in event.items()))


@app.command("train", epilog=TRAIN_EXAMPLES)
def train(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Checkpoints and the final model go here.")] = Path("runs/osd_tiny"),
    iters: Annotated[int, typer.Option("--iters", help="SR training steps.", min=1)] = 2500,
    ae_iters: Annotated[int, typer.Option("--ae-iters", help="Autoencoder warm-up steps.", min=0)] = 400,
    batch_size: BatchSize = 16,
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads.", min=1)] = 1,
    seed: Seed = 0,
    train_data: TrainData = None,
) -> None:
    """Train (or resume) the small one-step diffusion SR model osd-sr-tiny (x4) on CPU."""
    path = engine.run_train(run_dir, iters, ae_iters, batch_size, threads, seed, train_data, log=_log)
    typer.echo(str(path))


@app.command("quantize", epilog=QUANTIZE_EXAMPLES)
def quantize(
    model: Annotated[str, typer.Option("--model", "-m", help="FP diffusion model file (from `train`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Quantized model file to write.")],
    bits: Annotated[int, typer.Option("--bits", help="W/A bits: 2, 4 or 8.")] = 4,
    stages: Annotated[str, typer.Option("--stages", help="Comma list of trq, rpq, et.")] = "rpq,et",
    trq_timestep: Annotated[int | None, typer.Option("--trq-timestep", help="TRQ retraining timestep T (needed by "
                                                     "--stages trq; see `quantsr diffusion sweep`).",
                                                     show_default="none")] = None,
    trq_target: Annotated[str, typer.Option("--trq-target", help="TRQ retraining target: fp (distil the FP "
                                                                  "model) or gt (HR patches).")] = "fp",
    order: Annotated[str, typer.Option("--order", help="RPQ order: reverse (QArtSR) or forward (ablation).")] = "reverse",
    iters: Annotated[int, typer.Option("--iters", help="Optimizer steps per stage.", min=1)] = 300,
    patches: Patches = 256,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    train_data: TrainData = None,
    json_out: JsonOpt = False,
) -> None:
    """QArtSR: TRQ (optional), reversed per-module quantization (RPQ) and extended training (ET)."""
    if bits not in (2, 4, 8):
        raise typer.BadParameter(f"--bits {bits}: choose 2, 4 or 8")
    result = engine.run_quantize(model, out, bits=bits, stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
                                 trq_timestep=trq_timestep, order=order, iters=iters, patches=patches,
                                 batch=batch_size, seed=seed, dirs=train_data, trq_target=trq_target, log=_log)
    if json_out:
        print_json(result)
    else:
        typer.echo(result["out"])


@app.command("sweep", epilog=SWEEP_EXAMPLES)
def sweep(
    model: Annotated[str, typer.Option("--model", "-m", help="FP diffusion model file.")],
    timesteps: Annotated[list[int] | None, typer.Option("--timestep", "-t", help="Candidate T; repeatable.",
                                                        show_default="999, 899, 499, 1")] = None,
    bits: Annotated[int, typer.Option("--bits", help="W/A bits: 2, 4 or 8.")] = 4,
    retrain_iters: Annotated[int, typer.Option("--retrain-iters", help="LoRA steps at each T (0 = switch only).", min=0)] = 0,
    retrain_target: Annotated[str, typer.Option("--retrain-target", help="fp (distil the model) or gt (HR).")] = "fp",
    patches: Patches = 64,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    train_data: TrainData = None,
    json_out: JsonOpt = False,
) -> None:
    """TRQ sweep: HQ-latent quantization error and error amplification per timestep.

    Each candidate is quantized (PTQ init) and scored against the original model's output
    (image_psnr_vs_ref); the last line (selected in --json) is the timestep with the best score,
    the one to pass to quantize --stages trq --trq-timestep."""
    rows, selected = engine.run_sweep(model, timesteps or [999, 899, 499, 1], bits=bits,
                                      retrain_iters=retrain_iters, patches=patches, batch=batch_size, seed=seed,
                                      dirs=train_data, target=retrain_target, log=_log)
    if json_out:
        print_json({"rows": rows, "selected": selected})
        return
    for row in rows:
        typer.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    typer.echo(f"selected_timestep={selected}")

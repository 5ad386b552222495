"""Post-training quantization (``quantsr quantize --init FILE --iters 0``): calibrate and pack, no training.

The PTQ baseline every quantization toolkit offers, with quantsr's calibration
(:func:`quantsr_cli.quant.calibrate_`): one training-mode forward of a calibration batch initialises every
quantizer on its real input while each layer's bias absorbs the mean quantization error of its output
(bias correction, on unless ``bias_correction: false``). Learned steps (rbd, rlq, lsq) are set by a
mean-squared-error search on that input (``step_search``) instead of LSQ's ``2·mean|x|/sqrt(Qp)``, a rule of
thumb that training would correct and PTQ cannot: on the published IMDN x4 at W8A8 it is the difference
between 31.96 and 32.11 dB on Set5 (FP 32.21). The run folder receives the same files as a
training run's, minus the resumable checkpoints: ``qat_last.safetensors`` (fake-quant), the packed model
and ``summary.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.data import TrainDataset, check_patch_size
from quantsr_cli.engine.quantize import EventFn, QuantizeJob, default_train_dirs, phase, write_model_file, write_packed_file
from quantsr_cli.engine.validation import check_val_dataset, make_validator
from quantsr_cli.errors import ConfigError
from quantsr_cli.fileio import write_json
from quantsr_cli.quant import calibrate_, quantize_, quantized_layers


def run_ptq(job: QuantizeJob, model: nn.Module, on_event: EventFn | None = None) -> dict[str, Any]:
    """Quantize ``model`` (FP, from ``--init``) as ``job.quant`` says, calibrate it on one batch of
    ``job.train.batch_size`` training patches, validate once (unless ``val_every`` is 0 or there is no
    ``val_dataset``) and write the run's files; returns the summary (also ``summary.json``)."""
    cfg = job.train
    check_patch_size(cfg.patch_size, job.scale)
    validating = bool(cfg.val_dataset) and cfg.val_every > 0
    if validating:
        check_val_dataset(cfg.val_dataset, job.scale)  # a wrong name fails now, before calibration
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = job.run_dir or Path("runs") / job.run_name
    started = time.perf_counter()
    quantize_(model, job.quant)
    device = torch.device(job.device)
    model.to(device)
    train_dirs = cfg.train_data or default_train_dirs()
    phase(on_event, "loading data", ", ".join(os.path.basename(d.rstrip("/\\")) for d in train_dirs))
    data = TrainDataset(list(train_dirs), scale=job.scale, patch_size=cfg.patch_size, seed=cfg.seed)
    phase(on_event, "calibrating", f"{cfg.batch_size} patches (no training: iters=0)")
    calibrate_(model, data.sample_batch(0, cfg.batch_size)[0].to(device), bias_correction=cfg.bias_correction,
               step_search=True)
    model.eval()
    seconds = time.perf_counter() - started
    _emit(on_event, f"calibrated {len(quantized_layers(model))} layers on {cfg.batch_size} patches of {cfg.patch_size} px "
                    f"in {seconds:.1f} s (MSE step search, bias correction {'on' if cfg.bias_correction else 'off'})")
    psnr = None
    if validating:
        phase(on_event, "validating", cfg.val_dataset)
        with torch.no_grad():
            psnr = make_validator(job.scale, cfg.val_dataset, cfg.val_max_images, job.arch)(model)
        if on_event is not None:
            on_event({"event": "val", "iter": 0, "psnr": psnr, "best": psnr, "improved": True})
    extra: dict[str, Any] = {"command": job.command, "iters": 0, "ptq": True, "act_sign": job.quant.act_sign,
                             "bias_correction": cfg.bias_correction, "step_search": True, "calibration_patches": cfg.batch_size,
                             "train_data": [os.path.basename(d) for d in train_dirs], "best_psnr": psnr,
                             "val_dataset": cfg.val_dataset if psnr is not None else None}
    last = write_model_file(model, run_dir / "qat_last.safetensors", job.quant, extra)
    out = job.out or run_dir / "model.safetensors"
    phase(on_event, "packing", str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_packed_file(model, out, job.quant, extra)
    summary = {"run_dir": str(run_dir), "qat_last": str(last), "qat_best": None, "out": str(out), "iters": 0,
               "best_psnr": psnr, "best_iter": 0 if psnr is not None else None, "seconds": round(seconds, 3),
               "history": []}
    try:
        write_json(run_dir / "summary.json", summary)
    except OSError as exc:
        raise ConfigError(f"cannot write ({exc.strerror or exc})", run_dir / "summary.json") from None
    return summary


def _emit(on_event: EventFn | None, message: str) -> None:
    if on_event is not None:
        on_event({"event": "log", "message": message})

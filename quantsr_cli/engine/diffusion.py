"""``quantsr diffusion``: train the one-step diffusion SR model and quantize it with QArtSR.

Thin wrappers over :mod:`quantsr_cli.diffusion` (TRQ, RPQ, ET); files use the quantsr safetensors
format (kinds ``diffusion-fp`` / ``diffusion-qat``) and load through ``quantsr eval`` / ``upscale``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quantsr_cli.data import no_data_hint, shared_data_dir
from quantsr_cli.diffusion.ckpt import load_model as load_diffusion_model
from quantsr_cli.diffusion.ckpt import save_model as save_diffusion_model
from quantsr_cli.diffusion.pipeline import QArtSRConfig, run_qartsr
from quantsr_cli.diffusion.qmodel import QuantSpec
from quantsr_cli.diffusion.stages import CalibData
from quantsr_cli.diffusion.stages import calibration_data as calibration_patches
from quantsr_cli.diffusion.train_tiny import TinyTrainOptions, train_osd_tiny
from quantsr_cli.diffusion.trq import TRQ_TARGETS, retrain_timestep, select_timestep, timestep_sweep
from quantsr_cli.engine.modelio import loading, resolve_model_path
from quantsr_cli.engine.outputs import check_model_output, check_outputs, check_run_dir, clean_temp_files
from quantsr_cli.engine.runlock import RunDirLock
from quantsr_cli.errors import ConfigError
from quantsr_cli.fileio import dumps

LogFn = Callable[[dict[str, Any]], None]
STAGES = ("trq", "rpq", "et")


def _check_trq_target(flag: str, target: str) -> None:
    if target not in TRQ_TARGETS:
        raise ConfigError(f"{flag} {target!r}; choose {' or '.join(TRQ_TARGETS)}")


def train_dirs(dirs: list[str] | None) -> list[Path]:
    if dirs:
        return [Path(d) for d in dirs]
    root = shared_data_dir()
    if root is None:
        raise ConfigError(f"no training data: pass --train-data DIR, or: {no_data_hint()}")
    return [root / "train" / "T91", root / "train" / "BSD200"]


def calibration_data(dirs: list[str] | None, patches: int, patch: int, batch: int, seed: int) -> CalibData:
    """Fixed HR/LR calibration patches (x4, MATLAB bicubic LR) from the training folders."""
    return calibration_patches(train_dirs(dirs), patches, patch, batch, seed)


def run_train(run_dir: Path, iters: int, ae_iters: int, batch: int, threads: int, seed: int,
              dirs: list[str] | None, log: LogFn | None = None) -> Path:
    """Train (or resume) ``osd-sr-tiny``; returns the FP model file."""
    opts = TinyTrainOptions(iters=iters, ae_iters=ae_iters, batch_size=batch, threads=threads, seed=seed)
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    notice = (lambda message: log({"notice": message})) if log else None
    with RunDirLock(run_dir, on_notice=notice):
        clean_temp_files(run_dir)
        return train_osd_tiny(run_dir, train_dirs(dirs), opts, log=log)


def run_quantize(model_path: str, out: Path, *, bits: int, stages: tuple[str, ...], trq_timestep: int | None,
                 order: str, iters: int, patches: int, batch: int, seed: int, dirs: list[str] | None,
                 trq_target: str = "fp", log: LogFn | None = None) -> dict[str, Any]:
    """QArtSR: optional TRQ retraining at ``trq_timestep`` (distilling the FP model, or to HR with
    ``trq_target="gt"``), then RPQ (``order``) and/or ET; writes ``out``."""
    unknown = set(stages) - set(STAGES)
    if unknown or not stages:
        raise ConfigError(f"--stages {','.join(stages)}; choose from {','.join(STAGES)}")
    if order not in ("reverse", "forward"):
        raise ConfigError(f"--order {order!r}; choose reverse or forward")
    _check_trq_target("--trq-target", trq_target)
    check_model_output(out, "--out")
    check_outputs([(out, "--out")], [(resolve_model_path(model_path), "--model")])
    torch.manual_seed(seed)
    with loading(model_path):
        fp = load_diffusion_model(model_path).eval()
    data = calibration_data(dirs, patches, 64, batch, seed)
    if "trq" in stages:
        if trq_timestep is None:
            raise ConfigError("--stages trq needs --trq-timestep T (see `quantsr diffusion sweep`)")
        fp = retrain_timestep(fp, trq_timestep, data, iters=iters, target=trq_target, log=log)
    rpq_iters = iters if "rpq" in stages else 0
    et_iters = iters if "et" in stages else 0
    cfg = QArtSRConfig(w_bits=bits, a_bits=bits, rpq_iters=rpq_iters, et_iters=et_iters, order=order)
    result = run_qartsr(fp, cfg, data, log=log)
    report = json.loads(json.dumps(result.report, default=str))
    info = {"stages": list(stages), "order": order, "trq_timestep": trq_timestep, "report": report}
    if out.parent.is_dir():
        clean_temp_files(out.parent)
    save_diffusion_model(result.model, out, spec=result.spec, extra={"extra": dumps(info)})
    return {"out": str(out), "report": report}


def run_sweep(model_path: str, timesteps: list[int], *, bits: int, retrain_iters: int, patches: int, batch: int,
              seed: int, dirs: list[str] | None, target: str = "fp",
              log: LogFn | None = None) -> tuple[list[dict[str, Any]], int]:
    """Latent quantization error (and the amplification factor) per candidate timestep.

    Returns:
        ``(rows, selected)``: one row per ``T`` (:func:`~quantsr_cli.diffusion.trq.measure_latent_error`
        against the original model) and the ``T`` :func:`~quantsr_cli.diffusion.trq.select_timestep` picks.
    """
    _check_trq_target("--retrain-target", target)
    with loading(model_path):
        fp = load_diffusion_model(model_path).eval()
    data = calibration_data(dirs, patches, 64, batch, seed)
    rows, _ = timestep_sweep(fp, timesteps, QuantSpec(w_bits=bits, a_bits=bits), data,
                             retrain_iters=retrain_iters, target=target, log=log)
    return rows, select_timestep(rows)  # each row has its amplification factor already

"""QArtSR end to end: TRQ (optional) → quantize + calibrate → RPQ → ET, plus the PTQ/LSQ baselines.

Public entry points (plain functions, no CLI): :func:`run_qartsr`, :func:`run_ptq_minmax`, :func:`run_lsq`.
Each returns a :class:`QArtSRResult` with the fake-quantized model (``model``), the FP reference it was
distilled from (``fp_model``; the TRQ-retrained one when TRQ ran) and a JSON-able ``report``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields

from torch import nn

from quantsr_cli.diffusion.losses import make_perceptual
from quantsr_cli.diffusion.qmodel import QuantSpec, calibrate, quantize_model, set_quant_enabled
from quantsr_cli.diffusion.stages import CalibData, LogFn, run_e2e, run_rpq
from quantsr_cli.diffusion.trq import TRQ_TARGETS, retrain_timestep
from quantsr_cli.errors import ConfigError
from quantsr_cli.models.onestep import amplification_factor


@dataclass(frozen=True)
class QArtSRConfig:
    """Options of :func:`run_qartsr` (iterations are optimizer steps; learning rates are Adam's).

    Args:
        w_bits, a_bits: 2, 4 or 8 (quantized layers); keep-list layers use ``keep_bits``.
        quantizer: ``"lbq"`` (QArtSR) or ``"lsq"``.
        lowrank, lora, smooth, smooth_alpha: the finetuning components of every quantized layer.
        calib_batches: batches of FP activation statistics for the initialisation.
        rpq_iters: total RPQ steps, split evenly over the module chain (0 = skip RPQ).
        et_iters: extended end-to-end training steps (0 = skip ET).
        order: ``"reverse"`` (RPQ) or ``"forward"`` (ablation).
        lr: quantizer boundaries and log-phi; lr_weights: low-rank and LoRA factors.
        module_weight, image_weight: RPQ loss weights; a1, a2: perceptual / MSE weights of the image loss.
        perceptual: ``"auto"`` (LPIPS when its weights exist, else the SSIM+gradient stand-in),
            ``"lpips"``, ``"standin"`` or ``"none"``.
        trq_timestep: retrain the FP model at this timestep first (``None`` = no TRQ).
        trq_iters, trq_rank, trq_lr: the TRQ LoRA retraining.
        trq_target: what TRQ retrains towards: ``"fp"`` (the original model's output) or ``"gt"`` (HR).
    """

    w_bits: int = 4
    a_bits: int = 4
    quantizer: str = "lbq"
    lowrank: int = 4
    lora: int = 4
    smooth: bool = True
    smooth_alpha: float = 0.3
    keep_bits: int = 8
    calib_batches: int = 8
    rpq_iters: int = 300
    et_iters: int = 300
    order: str = "reverse"
    lr: float = 1e-2
    lr_weights: float = 1e-3
    module_weight: float = 1.0
    image_weight: float = 1.0
    a1: float = 1.0
    a2: float = 20.0
    perceptual: str = "auto"
    trq_timestep: int | None = None
    trq_iters: int = 300
    trq_rank: int = 4
    trq_lr: float = 1e-3
    trq_target: str = "fp"

    def __post_init__(self) -> None:
        if self.order not in ("reverse", "forward"):
            raise ConfigError(f"order={self.order!r}; choose reverse or forward")
        if self.perceptual not in ("auto", "lpips", "standin", "none"):
            raise ConfigError(f"perceptual={self.perceptual!r}; choose auto, lpips, standin or none")
        if min(self.rpq_iters, self.et_iters, self.trq_iters, self.calib_batches) < 0:
            raise ConfigError("iteration counts must be >= 0")
        if self.trq_target not in TRQ_TARGETS:
            raise ConfigError(f"trq_target={self.trq_target!r}; choose {' or '.join(TRQ_TARGETS)}")
        if self.trq_timestep is not None:
            amplification_factor(self.trq_timestep)  # validates the range
        self.quant_spec()  # validates bits/quantizer

    def quant_spec(self) -> QuantSpec:
        """The :class:`QuantSpec` of the fields both share (bits, quantizer, finetuning components)."""
        return QuantSpec(**{f.name: getattr(self, f.name) for f in fields(QuantSpec) if hasattr(self, f.name)})


@dataclass
class QArtSRResult:
    """``model``: fake-quantized (quantization enabled); ``fp_model``: its FP reference; ``report``."""

    model: nn.Module
    fp_model: nn.Module
    spec: QuantSpec
    report: dict[str, object] = field(default_factory=dict)


def _perceptual(kind: str) -> nn.Module | None:
    return None if kind == "none" else make_perceptual(kind)


def _quantized_copy(fp: nn.Module, spec: QuantSpec, data: CalibData, calib_batches: int) -> nn.Module:
    qm = copy.deepcopy(fp).eval()
    quantize_model(qm, spec)
    calibrate(qm, data.calibration_batches(calib_batches))
    return qm


def run_qartsr(model: nn.Module, config: QArtSRConfig, data: CalibData, *, log: LogFn | None = None) -> QArtSRResult:
    """Quantize a one-step diffusion SR model with QArtSR.

    Steps: (1) TRQ — when ``config.trq_timestep`` is set, retrain a copy of the FP model at that
    timestep (LoRA only, merged); (2) wrap the layers (``config.quant_spec()``), initialise phi/SVD/
    quantizers from FP statistics; (3) RPQ over ``model.rpq_modules()``; (4) ET. ``model`` itself is
    never modified; the original weights inside the quantized copy stay bit-identical.

    Args:
        model: FP one-step model following the contract in :mod:`quantsr_cli.diffusion`.
        config: see :class:`QArtSRConfig`.
        data: calibration/training patches (LR, and HR for TRQ's GT retraining).
        log: progress callback (dicts).
    """
    perceptual = _perceptual(config.perceptual)
    report: dict[str, object] = {"method": "qartsr", "config": asdict(config),
                                 "perceptual": getattr(perceptual, "name", "none")}
    t0 = time.time()
    fp = copy.deepcopy(model).eval()
    if config.trq_timestep is not None:
        fp = retrain_timestep(fp, config.trq_timestep, data, iters=config.trq_iters, rank=config.trq_rank,
                              lr=config.trq_lr, target=config.trq_target, perceptual=perceptual, log=log)
        report["trq"] = {"timestep": config.trq_timestep, "iters": config.trq_iters, "target": config.trq_target,
                         "amplification": amplification_factor(config.trq_timestep),
                         "seconds": round(time.time() - t0, 1)}
    fp.requires_grad_(False)
    spec = config.quant_spec()
    qm = _quantized_copy(fp, spec, data, config.calib_batches)
    common = dict(lr=config.lr, lr_weights=config.lr_weights, perceptual=perceptual, a1=config.a1, a2=config.a2,
                  log=log)
    if config.rpq_iters > 0:
        t1 = time.time()
        report["rpq"] = run_rpq(qm, fp, data, iters=config.rpq_iters, order=config.order,
                                module_weight=config.module_weight, image_weight=config.image_weight, **common)
        report["rpq_seconds"] = round(time.time() - t1, 1)
    if config.et_iters > 0:
        t1 = time.time()
        report["et"] = run_e2e(qm, fp, data, iters=config.et_iters, step0=config.rpq_iters, **common)
        report["et_seconds"] = round(time.time() - t1, 1)
    set_quant_enabled(qm, True)
    report["seconds"] = round(time.time() - t0, 1)
    return QArtSRResult(qm.eval(), fp, spec, report)


def run_ptq_minmax(model: nn.Module, w_bits: int, a_bits: int, data: CalibData, *, calib_batches: int = 8,
                   keep_bits: int = 8) -> QArtSRResult:
    """Naive PTQ baseline: min-max ranges from FP statistics, no smoothing/low-rank/LoRA, no training."""
    spec = QuantSpec(w_bits=w_bits, a_bits=a_bits, smooth=False, lowrank=0, lora=0, act_init="minmax",
                     keep_bits=keep_bits)
    fp = copy.deepcopy(model).eval().requires_grad_(False)
    qm = _quantized_copy(fp, spec, data, calib_batches)
    set_quant_enabled(qm, True)
    return QArtSRResult(qm.eval(), fp, spec, {"method": "ptq-minmax", "spec": spec.to_dict()})


def run_lsq(model: nn.Module, config: QArtSRConfig, data: CalibData, *, log: LogFn | None = None) -> QArtSRResult:
    """LSQ-QAT baseline: LSQ/LSQ+ quantizers and the same finetuning components as ``config``, trained
    end to end (MSE to the FP output, ``a1 = 0``) for ``rpq_iters + et_iters`` steps (same budget)."""
    lsq = QArtSRConfig(**{**asdict(config), "quantizer": "lsq", "trq_timestep": None})
    spec = lsq.quant_spec()
    fp = copy.deepcopy(model).eval().requires_grad_(False)
    qm = _quantized_copy(fp, spec, data, lsq.calib_batches)
    iters = lsq.rpq_iters + lsq.et_iters
    rec = run_e2e(qm, fp, data, iters=iters, lr=lsq.lr, lr_weights=lsq.lr_weights, perceptual=None, a1=0.0,
                  a2=lsq.a2, log=log, stage="lsq")
    return QArtSRResult(qm.eval(), fp, spec, {"method": "lsq", "config": asdict(lsq), "train": rec})

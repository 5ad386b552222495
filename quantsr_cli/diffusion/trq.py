"""Timestep retraining for quantization (TRQ).

The one-step model's fixed timestep ``T`` only enters as a constant UNet input and through the x0
update, whose factor ``sqrt(1 - abar_T) / sqrt(abar_T)`` multiplies any UNet-output quantization error
(:func:`quantsr_cli.models.onestep.amplification_factor`). TRQ retrains the FP one-step model at a
smaller ``T`` — LoRA on the denoiser's layers only, then merged — and quantizes the retrained model.
:func:`measure_latent_error` quantizes only the denoiser (encoder/decoder FP) and reports the latent
error; :func:`timestep_sweep` does that per candidate ``T`` and :func:`select_timestep` picks one.

Choosing ``T``: the paper selects the ``T`` that minimizes the HQ-latent quantization error; its
candidates are retrained from SD-2.1, whose UNet is a denoiser at every ``T``. A one-step model trained
only at ``T=999`` (``osd-sr-tiny``) is not: after retraining at a smaller ``T`` its FP output drifts, and
the smallest latent error (at ``T=1``, amplification 0.04) came with a retrained FP model at 14 dB. So the
selection here scores each candidate end to end — the PTQ-quantized retrained model's decoded image
against the *original* FP model's output on the calibration patches (``image_psnr_vs_ref``), which
counts both the retraining drift and the quantization error — and the original ``T`` (not retrained)
is always a candidate, so TRQ can only pick a timestep that measurably helps.

Models follow the one-step contract: ``set_timestep(t)``, ``timestep``, ``latents(lr) -> (z_L, eps, z_H)``,
``decode(z_H)``, ``lora_patterns`` and ``denoiser_prefix``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.diffusion.losses import image_loss
from quantsr_cli.diffusion.qmodel import (QuantSpec, calibrate, dequantize_model, finetune_parameters, quantize_model,
                                          set_quant_enabled)
from quantsr_cli.diffusion.stages import CalibData
from quantsr_cli.models.onestep import amplification_factor

LogFn = Callable[[dict[str, object]], None]
TRQ_TARGETS = ("fp", "gt")
"""What TRQ retrains towards: the original model's output (``fp``) or the HR patches (``gt``)."""


def retrain_timestep(model: nn.Module, timestep: int, data: CalibData, *, iters: int = 300, rank: int = 4,
                     lr: float = 1e-3, target: str = "fp", perceptual: nn.Module | None = None,
                     a1: float = 0.05, log: LogFn | None = None, log_every: int = 25) -> nn.Module:
    """Return a copy of the FP one-step ``model`` retrained (LoRA only, merged) at ``timestep``.

    Args:
        model: FP one-step model (not modified).
        timestep: the new fixed timestep in [0, 999].
        data: training patches; ``target="gt"`` needs ``data.hr``.
        iters: optimizer steps (0 = only change the timestep, no retraining).
        rank: LoRA rank on every layer matched by ``model.lora_patterns`` (original weights frozen).
        target: ``"fp"`` (default: distil the original model at its own timestep — what the CLI, the
            engine and ``bench/qartsr_compare.py`` use), ``"gt"`` (L1 + ``a1`` * perceptual to HR) or
            ``"auto"`` (gt when HR is given).

    Returns:
        a plain FP model (no wrappers) with ``timestep`` set and the LoRA merged into its weights.
    """
    if target not in (*TRQ_TARGETS, "auto"):
        raise ValueError(f"target={target!r}; choose fp, gt or auto")
    use_gt = target == "gt" or (target == "auto" and data.hr is not None)
    if use_gt and data.hr is None:
        raise ValueError("target='gt' needs HR patches in the calibration data")
    teacher = None if use_gt else copy.deepcopy(model).eval().requires_grad_(False)
    student = copy.deepcopy(model)
    student.set_timestep(timestep)
    if iters <= 0:
        return student.eval()
    spec = QuantSpec(w_bits=32, a_bits=32, keep_bits=32, smooth=False, lowrank=0, lora=rank, attention=False,
                     keep_patterns=())
    quantize_model(student, spec, patterns=getattr(student, "lora_patterns", None))
    params = list(finetune_parameters(student))
    opt = torch.optim.Adam(params, lr=lr)
    student.eval()
    t0 = time.time()
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * it / iters)))
        x, hr = data.batch(it)
        out = student(x)
        if use_gt:
            loss = F.l1_loss(out, hr)
            if perceptual is not None and a1 > 0:
                loss = loss + a1 * perceptual(out, hr)
        else:
            with torch.no_grad():
                ref = teacher(x)
            loss = image_loss(out, ref, perceptual, a1, 20.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and ((it + 1) % log_every == 0 or it + 1 == iters):
            log({"stage": "trq", "timestep": timestep, "it": it + 1, "of": iters, "loss": round(loss.item(), 6),
                 "sec_per_it": round((time.time() - t0) / (it + 1), 3)})
    return dequantize_model(student, merge_lora=True).eval()


def _psnr(se: float, count: int) -> float:
    mse = se / max(count, 1)
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def measure_latent_error(model: nn.Module, spec: QuantSpec, data: CalibData, *, calib_batches: int = 4,
                         eval_batches: int = 4, reference: nn.Module | None = None) -> dict[str, float]:
    """Quantize only the denoiser (min-max/PTQ init of ``spec``, no training) and measure errors.

    Args:
        reference: optional FP model (e.g. the original one before TRQ retraining); its output on the
            same patches is the target of ``image_psnr_vs_ref``.

    Returns:
        ``timestep``, ``amplification``, ``eps_rmse`` (UNet output), ``zh_rmse`` (HQ latent),
        ``zh_rel`` (``zh_rmse / rms(z_H)``), ``image_psnr_vs_fp`` (dB, decoded with the FP decoder,
        against ``model``'s own FP output) and, with ``reference``, ``image_psnr_vs_ref`` (dB, the same
        quantized output against ``reference``'s output; images clamped to [0, 1]).
    """
    qm = copy.deepcopy(model).eval()
    quantize_model(qm, spec)
    calibrate(qm, data.calibration_batches(calib_batches))
    prefix = getattr(qm, "denoiser_prefix", "unet") + "."
    se_eps = se_zh = energy = se_img = se_ref = 0.0
    count = count_img = 0
    for b in range(eval_batches):
        x, _ = data.batch(b)
        set_quant_enabled(qm, False)
        _, eps_fp, zh_fp = qm.latents(x)
        img_fp = qm.decode(zh_fp)
        set_quant_enabled(qm, lambda n: n.startswith(prefix))
        _, eps_q, zh_q = qm.latents(x)
        set_quant_enabled(qm, False)
        img_q = qm.decode(zh_q)
        se_eps += float((eps_q - eps_fp).pow(2).sum())
        se_zh += float((zh_q - zh_fp).pow(2).sum())
        energy += float(zh_fp.pow(2).sum())
        count += zh_fp.numel()
        se_img += float((img_q.clamp(0, 1) - img_fp.clamp(0, 1)).pow(2).sum())
        if reference is not None:
            se_ref += float((img_q.clamp(0, 1) - reference(x).clamp(0, 1)).pow(2).sum())
        count_img += img_fp.numel()
    row = {"timestep": int(model.timestep), "amplification": amplification_factor(int(model.timestep)),
           "eps_rmse": math.sqrt(se_eps / count), "zh_rmse": math.sqrt(se_zh / count),
           "zh_rel": math.sqrt(se_zh / max(energy, 1e-12)), "image_psnr_vs_fp": _psnr(se_img, count_img)}
    if reference is not None:
        row["image_psnr_vs_ref"] = _psnr(se_ref, count_img)
    return row


def select_timestep(rows: Sequence[dict[str, float]]) -> int:
    """The timestep of the sweep row with the highest ``image_psnr_vs_ref`` (ties: the larger ``T``).

    ``rows`` come from :func:`timestep_sweep` (or :func:`measure_latent_error` with ``reference``).
    """
    if not rows:
        raise ValueError("select_timestep needs at least one sweep row")
    if any("image_psnr_vs_ref" not in r for r in rows):
        raise ValueError("select_timestep needs rows measured with reference= (image_psnr_vs_ref)")
    return int(max(rows, key=lambda r: (r["image_psnr_vs_ref"], r["timestep"]))["timestep"])


def timestep_sweep(model: nn.Module, timesteps: Sequence[int], spec: QuantSpec, data: CalibData, *,
                   retrain_iters: int = 0, rank: int = 4, lr: float = 1e-3, target: str = "fp",
                   perceptual: nn.Module | None = None, log: LogFn | None = None) -> tuple[list[dict[str, float]], dict[int, nn.Module]]:
    """Latent quantization error per candidate timestep.

    For each ``T``: retrain the FP model at ``T`` (``retrain_iters`` LoRA steps; 0 = just switch ``T``,
    which measures the pure amplification effect on the same network; the model's own ``T`` is used
    as it is), then :func:`measure_latent_error` with the original model as the reference, so
    :func:`select_timestep` can pick from the rows.

    Returns:
        ``(rows, models)``: one dict per ``T`` (see :func:`measure_latent_error`) and the FP model used
        for each ``T``.
    """
    rows, models = [], {}
    for t in timesteps:
        if int(t) == int(model.timestep):
            fp_t = copy.deepcopy(model).eval()
        else:
            fp_t = retrain_timestep(model, int(t), data, iters=retrain_iters, rank=rank, lr=lr, target=target,
                                    perceptual=perceptual, log=log)
        row = measure_latent_error(fp_t, spec, data, reference=model)
        if log:
            log({"stage": "trq-sweep", **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}})
        rows.append(row)
        models[int(t)] = fp_t
    return rows, models

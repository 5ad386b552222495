"""Benchmark evaluation of (fake-quantized) SR models: Y-channel PSNR/SSIM, BasicSR conventions
(:mod:`quantsr_cli.metrics`: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``, ``s`` border pixels shaved).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantsr_cli.diffusion.data_local import load_benchmark, to_tensor, to_uint8
from quantsr_cli.metrics import calculate_psnr, calculate_ssim


def psnr_ssim_y(sr: np.ndarray, hr: np.ndarray, crop_border: int) -> tuple[float, float]:
    """Y-channel ``(PSNR dB, SSIM)`` of RGB ``uint8 (H, W, 3)`` arrays of equal size."""
    return (float(calculate_psnr(sr, hr, crop_border, test_y_channel=True)),
            float(calculate_ssim(sr, hr, crop_border, test_y_channel=True)))


@torch.no_grad()
def evaluate_sr(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], root: str | Path,
                datasets: Sequence[str] = ("Set5", "Set14"), scale: int = 4,
                max_images: int = 0) -> dict[str, dict[str, float]]:
    """Mean Y PSNR/SSIM of ``model`` (LR ``(1, 3, h, w)`` in [0, 1] → SR) on benchmark folders.

    Returns:
        ``{dataset: {"psnr": dB, "ssim": float, "images": n, "seconds": s}}``.
    """
    device = torch.device("cpu")
    if isinstance(model, nn.Module):
        model.eval()
        device = next(model.parameters()).device
    results: dict[str, dict[str, float]] = {}
    for name in datasets:
        items = load_benchmark(root, name, scale)
        if max_images:
            items = items[:max_images]
        t0 = time.time()
        ps, ss = [], []
        for _, lr, hr in items:
            sr = to_uint8(model(to_tensor(lr).to(device)))
            p, s = psnr_ssim_y(sr, hr, scale)
            ps.append(p)
            ss.append(s)
        results[name] = {"psnr": float(np.mean(ps)), "ssim": float(np.mean(ss)), "images": len(items),
                         "seconds": round(time.time() - t0, 2)}
    return results


def bicubic_baseline(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """torch bicubic upsampling (the model's own input), for a reference row."""
    return torch.nn.functional.interpolate(lr, scale_factor=float(scale), mode="bicubic", align_corners=False)

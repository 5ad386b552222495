"""PSNR and SSIM exactly as BasicSR computes them (``basicsr/metrics/psnr_ssim.py``).

Conventions (the ones low-bit SR papers report): uint8-range images; ``crop_border`` pixels removed
from each edge; optional Y channel of MATLAB's ``rgb2ycbcr`` (BT.601 studio swing,
``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1]; float, not rounded); metric in
float64. Arrays here are **RGB** (BasicSR's are BGR); channels are flipped internally so every
floating-point operation happens in BasicSR's order and the numbers agree bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["to_y_channel", "calculate_psnr", "calculate_ssim", "evaluate_pair"]


def _as_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    return img[..., None] if img.ndim == 2 else img


def to_y_channel(img: np.ndarray) -> np.ndarray:
    """Y of MATLAB ``rgb2ycbcr`` in the [0, 255] range, unrounded (BasicSR ``to_y_channel``).

    Args:
        img: ``(H, W, 3)`` RGB, uint8 or float in ``[0, 255]``. Other channel counts pass through
            (scaled like BasicSR).

    Returns:
        float32 ``(H, W, 1)`` (``(H, W, C)`` when not 3 channels) in ``[16, 235]`` for Y.
    """
    x = _as_hwc(img).astype(np.float32) / 255.0
    if x.shape[2] == 3:
        bgr = x[..., ::-1]
        y = np.dot(bgr, [24.966, 128.553, 65.481]) + 16.0
        x = (y / 255.0).astype(np.float32)[..., None]
    return x * 255.0


def _prepare(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool):
    img, img2 = _as_hwc(img), _as_hwc(img2)
    if img.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {img2.shape}")
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    if test_y_channel:
        img, img2 = to_y_channel(img), to_y_channel(img2)
    elif img.shape[2] == 3:
        img, img2 = img[..., ::-1], img2[..., ::-1]  # BGR order like BasicSR (channel mean order)
    return img.astype(np.float64), img2.astype(np.float64)


def calculate_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool = True) -> float:
    """PSNR in dB, ``10 log10(255^2 / MSE)``; ``inf`` for identical images.

    Args:
        img: ``(H, W, 3)`` RGB (or ``(H, W)`` / ``(H, W, 1)`` gray), uint8 or float in ``[0, 255]``.
        img2: same shape as ``img``.
        crop_border: pixels removed from each edge before measuring (usually the SR scale).
        test_y_channel: measure on Y (MATLAB YCbCr) instead of all channels.

    Returns:
        PSNR in dB (float).
    """
    a, b = _prepare(img, img2, crop_border, test_y_channel)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _ssim(img: np.ndarray, img2: np.ndarray) -> float:
    """SSIM of one float64 ``(H, W)`` channel in [0, 255] (Wang et al. MATLAB code; 11x11 Gaussian, sigma 1.5)."""
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean()


def calculate_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool = True) -> float:
    """SSIM (mean over channels), BasicSR/MATLAB-compatible.

    Args:
        img: ``(H, W, 3)`` RGB (or gray), uint8 or float in ``[0, 255]``; after cropping both sides
            must exceed 10 px (the 11x11 window's valid region).
        img2: same shape as ``img``.
        crop_border: pixels removed from each edge before measuring.
        test_y_channel: measure on Y (MATLAB YCbCr) instead of all channels.

    Returns:
        SSIM in ``[-1, 1]`` (float); 1 for identical images.
    """
    a, b = _prepare(img, img2, crop_border, test_y_channel)
    if min(a.shape[0], a.shape[1]) <= 10:
        raise ValueError(f"SSIM needs images larger than 10x10 after cropping, got {a.shape[1]}x{a.shape[0]}")
    ssims = [_ssim(a[..., i], b[..., i]) for i in range(a.shape[2])]
    return float(np.array(ssims).mean())


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """BasicSR ``tensor2img`` (clamp, x255 in float32, round half even), RGB ``(H, W, C)``."""
    t = x.detach().to("cpu", torch.float32)
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected one image (1, C, H, W), got shape {tuple(x.shape)}")
        t = t[0]
    return (t.clamp(0, 1) * 255.0).round().numpy().astype(np.uint8).transpose(1, 2, 0)


def evaluate_pair(
    sr: torch.Tensor,
    hr: torch.Tensor,
    scale: int,
    crop_border: int | None = None,
    test_y_channel: bool = True,
) -> tuple[float, float]:
    """PSNR/SSIM of one SR output against its HR image, BasicSR validation style.

    Both are rounded to uint8 first (``tensor2img``); HR is cropped (top-left kept) to the SR size,
    which must be at most the HR size cropped to a multiple of ``scale``.

    Args:
        sr: ``(1, 3, H, W)`` or ``(3, H, W)`` float, nominally in ``[0, 1]`` (clamped).
        hr: ``(1, 3, H', W')`` float in ``[0, 1]`` with ``H' >= H``, ``W' >= W``.
        scale: SR factor; the default ``crop_border``.
        crop_border: pixels shaved from each edge; default ``scale``.
        test_y_channel: Y channel (default, as SR papers) or RGB.

    Returns:
        ``(psnr_db, ssim)``.
    """
    a, b = _to_uint8(sr), _to_uint8(hr)
    h, w = a.shape[:2]
    hh, hw = b.shape[0] // scale * scale, b.shape[1] // scale * scale
    if h > hh or w > hw:
        raise ValueError(f"SR output {w}x{h} is larger than the HR image {b.shape[1]}x{b.shape[0]}")
    b = b[:h, :w]
    border = scale if crop_border is None else crop_border
    psnr = calculate_psnr(a, b, border, test_y_channel)
    ssim = calculate_ssim(a, b, border, test_y_channel)
    return psnr, ssim

"""MATLAB-compatible bicubic ``imresize`` in torch.

Reproduces MATLAB's ``imresize(A, scale, 'bicubic')`` (Image Processing Toolbox), which is how the
classic SR benchmark LR images were made:

- Keys cubic kernel with ``a = -0.5`` and support ``[-2, 2]``;
- when downscaling (``scale < 1``) with antialiasing, the kernel is widened to ``4 / scale`` pixels and
  its weights become ``scale * cubic(scale * x)``;
- output pixel ``x`` (1-based) samples input coordinate ``u = x / scale + 0.5 * (1 - 1 / scale)``;
- weights of each output pixel are normalised to sum to 1;
- borders use symmetric (half-sample mirror) padding, i.e. the index sequence ``1..n, n..1`` repeated;
- the two dimensions are resized one after the other, the one with the smaller scale first
  (height first when equal);
- output size is ``ceil(in * scale)`` unless given.

Weights are computed in float64 like MATLAB's ``double`` path. For ``uint8`` inputs MATLAB's
resampler writes each pass back into a ``uint8`` image (round half away from zero, saturate);
:func:`imresize_uint8` reproduces this, :func:`imresize` (float) does not round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["cubic", "contributions", "imresize", "imresize_uint8", "matlab_lr"]


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys cubic convolution kernel with ``a = -0.5`` (MATLAB ``cubic``).

    Args:
        x: distances in pixels, any shape, float.

    Returns:
        Kernel values, same shape and dtype; zero outside ``|x| <= 2``.
    """
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1).to(x.dtype)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)).to(x.dtype)
    return inner + outer


def contributions(
    in_length: int, out_length: int, scale: float, antialias: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and source indices of a 1-D MATLAB bicubic resize.

    Args:
        in_length: input length in pixels.
        out_length: output length in pixels.
        scale: output/input ratio used for the sampling grid (MATLAB's scale argument).
        antialias: widen the kernel when ``scale < 1`` (MATLAB default ``'Antialiasing', true``).

    Returns:
        ``(weights, indices)``: float64 ``(out_length, P)`` weights that sum to 1 per row, and int64
        ``(out_length, P)`` 0-based input indices already folded by symmetric padding.
    """
    kernel_width = 4.0
    if scale < 1 and antialias:
        kernel_width = kernel_width / scale
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    dist = u[:, None] - idx
    if scale < 1 and antialias:
        weights = scale * cubic(dist * scale)
    else:
        weights = cubic(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Symmetric padding: 1-based index i maps through aux = [1..n, n..1] (period 2n).
    idx0 = idx.to(torch.int64) - 1
    period = 2 * in_length
    m = torch.remainder(idx0, period)
    folded = torch.where(m < in_length, m, period - 1 - m)
    # MATLAB drops taps whose weight is zero for every output pixel; they add nothing either way.
    keep = (weights != 0).any(dim=0)
    return weights[:, keep], folded[:, keep]


def _plan(
    in_hw: Sequence[int], scale: float | Sequence[float] | None, size: Sequence[int] | None
) -> tuple[list[float], list[int]]:
    """Per-dimension scales and output sizes, MATLAB rules (size wins over scale for the length)."""
    if scale is None and size is None:
        raise ValueError("imresize needs a scale or an output size")
    if scale is not None:
        scales = [float(scale)] * 2 if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if any(s <= 0 for s in scales):
            raise ValueError(f"scale must be positive, got {scale}")
        if size is None:
            sizes = [int(math.ceil(n * s - 1e-9)) for n, s in zip(in_hw, scales)]
        else:
            sizes = [int(v) for v in size]
    else:
        sizes = [int(v) for v in size]  # type: ignore[union-attr]
        scales = [o / n for o, n in zip(sizes, in_hw)]
    if len(sizes) != 2 or any(v < 1 for v in sizes):
        raise ValueError(f"output size must be two positive integers, got {sizes}")
    return scales, sizes


def _resize_dim(x: torch.Tensor, dim: int, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Weighted sum of gathered rows/columns along ``dim`` (taps accumulated in order)."""
    if dim == x.dim() - 1:  # index_select on the last dim is slow: work on the transpose
        return _resize_dim(x.transpose(-2, -1).contiguous(), dim - 1, weights, indices).transpose(-2, -1)
    shape = [1] * x.dim()
    shape[dim] = weights.shape[0]
    out = None
    for p in range(weights.shape[1]):
        w = weights[:, p].to(x.dtype).view(shape)
        term = x.index_select(dim, indices[:, p]) * w
        out = term if out is None else out + term
    assert out is not None
    return out


def _resize(
    x: torch.Tensor,
    scale: float | Sequence[float] | None,
    size: Sequence[int] | None,
    antialias: bool,
    round_each_pass: float | None,
) -> torch.Tensor:
    h, w = x.shape[-2], x.shape[-1]
    scales, sizes = _plan((h, w), scale, size)
    order = sorted(range(2), key=lambda d: scales[d])  # stable: height first on ties
    device = x.device
    x = x.contiguous()
    for d in order:
        in_len = (h, w)[d]
        if sizes[d] == in_len and scales[d] == 1.0:
            continue
        weights, indices = contributions(in_len, sizes[d], scales[d], antialias)
        x = _resize_dim(x, x.dim() - 2 + d, weights.to(device), indices.to(device))
        if round_each_pass is not None:
            x = torch.floor(x.clamp(0, round_each_pass) + 0.5)
    return x.contiguous()


def imresize(
    x: torch.Tensor,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    *,
    antialias: bool = True,
) -> torch.Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')`` on a float tensor (no rounding, no clamping).

    Args:
        x: ``(..., H, W)`` float tensor, e.g. ``(N, C, H, W)`` in ``[0, 1]``; any range works.
        scale: output/input ratio, one float or ``(scale_h, scale_w)``; e.g. ``1/4`` to downscale x4.
        size: output ``(H_out, W_out)`` in pixels. With ``scale`` too, ``scale`` sets the sampling
            grid and ``size`` the length (MATLAB semantics); alone, the scale is ``size / input``.
        antialias: widen the kernel when downscaling (MATLAB default).

    Returns:
        ``(..., H_out, W_out)`` tensor of ``x``'s dtype and device; computed in float64. Values may
        overshoot the input range (bicubic ringing); clamp yourself.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"imresize expects a float tensor, got {x.dtype}; use imresize_uint8 for uint8")
    if x.dim() < 2:
        raise ValueError(f"imresize expects (..., H, W), got shape {tuple(x.shape)}")
    return _resize(x.to(torch.float64), scale, size, antialias, None).to(x.dtype)


def imresize_uint8(
    img: np.ndarray | torch.Tensor,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    *,
    antialias: bool = True,
    max_value: int = 255,
) -> np.ndarray | torch.Tensor:
    """MATLAB ``imresize`` on an integer image: each pass rounds and saturates like MATLAB's uint8 path.

    Args:
        img: integer image, numpy ``(H, W)`` / ``(H, W, C)`` or torch ``(..., H, W)``, values in
            ``[0, max_value]``.
        scale: as in :func:`imresize`.
        size: as in :func:`imresize`.
        antialias: as in :func:`imresize`.
        max_value: saturation value (255 for uint8, 65535 for uint16).

    Returns:
        The resized image, same container, layout and dtype as ``img``.
    """
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise ValueError(f"expected (H, W) or (H, W, C), got shape {img.shape}")
        t = torch.from_numpy(np.ascontiguousarray(img).astype(np.float64))
        t = t.unsqueeze(0) if img.ndim == 2 else t.permute(2, 0, 1)
        out = _resize(t, scale, size, antialias, float(max_value))
        out = out[0] if img.ndim == 2 else out.permute(1, 2, 0)
        return out.numpy().astype(img.dtype)
    out = _resize(img.to(torch.float64), scale, size, antialias, float(max_value))
    return out.to(img.dtype)


def matlab_lr(hr_levels: torch.Tensor, scale: int, peak: int = 255) -> torch.Tensor:
    """MATLAB ``imresize(HR, 1/scale, 'bicubic')`` of integer HR levels (cropped to a multiple of ``scale``).

    Args:
        hr_levels: integer tensor ``(..., H, W)`` with values in ``[0, peak]``.
        scale: integer downscaling factor.
        peak: 255 for 8-bit, 65535 for 16-bit data.

    Returns:
        Integer tensor ``(..., H // scale, W // scale)`` of the same dtype.
    """
    h, w = hr_levels.shape[-2] // scale * scale, hr_levels.shape[-1] // scale * scale
    return imresize_uint8(hr_levels[..., :h, :w], 1.0 / scale, (h // scale, w // scale), max_value=peak)

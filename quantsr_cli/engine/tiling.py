"""Run an SR model over an image, whole or in overlapping tiles (Real-ESRGAN style).

Tiling bounds memory for large images: each tile of ``tile`` LR pixels is processed with ``tile_pad``
extra LR pixels of context on every side, and only its centre is pasted into the output, so seams
are invisible when ``tile_pad`` covers the model's receptive field (16 px is plenty for the
shipped models; the test checks tiled == untiled within 1/255).
"""

from __future__ import annotations

import torch
from torch import nn

from collections.abc import Callable

from quantsr_cli.errors import ConfigError, NumericError


def all_finite(t: torch.Tensor, rows: int = 256) -> bool:
    """True when ``t`` (N, C, H, W) holds no NaN/Inf; checked in row bands to keep the mask small."""
    return all(bool(torch.isfinite(band).all()) for band in t.split(rows, dim=-2))


def _finite_output(sr: torch.Tensor) -> torch.Tensor:
    if not all_finite(sr):
        raise NumericError("the model's output holds NaN/Inf values")
    return sr


@torch.inference_mode()
def upscale_tensor(
    model: nn.Module, lr: torch.Tensor, scale: int, tile: int = 0, tile_pad: int = 16,
    on_tile: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Super-resolve ``lr``.

    Args:
        model: maps (N,3,h,w) in [0,1] to (N,3,h*scale,w*scale).
        lr: (N,3,h,w) float in [0,1], on the model's device.
        scale: the model's upscaling factor.
        tile: LR tile side in pixels; 0 processes the whole image at once.
        tile_pad: LR context pixels around each tile.
        on_tile: called as ``on_tile(done, total)`` after each tile (progress for large images).

    Returns:
        (N,3,h*scale,w*scale) float tensor clamped to [0,1].

    Raises:
        NumericError: the model produced NaN or Inf (a damaged or overflowing model); never written as black.
    """
    if tile < 0 or tile_pad < 0:
        raise ConfigError(f"tile ({tile}) and tile_pad ({tile_pad}) must not be negative")
    _, _, h, w = lr.shape
    if tile == 0 or (h <= tile and w <= tile):
        return _finite_output(model(lr)).clamp_(0, 1)
    n, c = lr.shape[:2]
    out = lr.new_zeros((n, c, h * scale, w * scale))
    total, done = -(-h // tile) * -(-w // tile), 0
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            ptop, pleft = max(top - tile_pad, 0), max(left - tile_pad, 0)
            pbottom, pright = min(bottom + tile_pad, h), min(right + tile_pad, w)
            sr = _finite_output(model(lr[:, :, ptop:pbottom, pleft:pright]))
            oy, ox = (top - ptop) * scale, (left - pleft) * scale
            th, tw = (bottom - top) * scale, (right - left) * scale
            out[:, :, top * scale : bottom * scale, left * scale : right * scale] = sr[
                :, :, oy : oy + th, ox : ox + tw
            ]
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    return out.clamp_(0, 1)

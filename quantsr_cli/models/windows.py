"""Window helpers of Swin-style attention: partition, reverse, relative positions, the shifted-window mask."""

from __future__ import annotations

import torch
from torch import Tensor

MASK_VALUE = -100.0


def window_partition(x: Tensor, ws: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * H/ws * W/ws, ws, ws, C)`` non-overlapping windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, c)


def window_reverse(windows: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws, ws, C)`` -> ``(B, H, W, C)``."""
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.reshape(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def relative_position_index(ws: int) -> Tensor:
    """``(ws², ws²)`` int64: ``(dh + ws - 1) * (2 ws - 1) + (dw + ws - 1)`` for every pair of window cells."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device: torch.device | None = None) -> Tensor:
    """Attention mask of the cyclically shifted windows of an ``h x w`` map (multiples of ``ws``).

    Returns ``(nW, ws², ws²)`` float32 with 0 where two cells come from the same region, -100 elsewhere.
    """
    region = torch.zeros(1, h, w, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for wsl in cuts:
            region[:, hs, wsl, :] = label
            label += 1
    cells = window_partition(region, ws).reshape(-1, ws * ws)
    diff = cells.unsqueeze(1) - cells.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)

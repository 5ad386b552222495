"""Building blocks of the tiny one-step diffusion SR model (SD/OSEDiff-shaped, small).

Feature maps are ``(N, C, H, W)`` float tensors; token sequences ``(N, L, C)``. Attention exposes
``nn.Identity`` activation points ``q_act``, ``k_act``, ``v_act`` (after the projections) and
``attn_act`` (softmax output) that the quantization engine replaces by activation quantizers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` (shape ``(N,)``) → ``(N, dim)`` (cos | sin halves)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 (+ time embedding) GroupNorm-SiLU-conv3x3, residual (1x1 if C changes)."""

    def __init__(self, cin: int, cout: int, temb_dim: int = 0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None and temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Multi-head (cross-)attention with quantizable activation points (SD ``to_q/k/v/out`` naming)."""

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        ctx = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.q_act = nn.Identity()
        self.k_act = nn.Identity()
        self.v_act = nn.Identity()
        self.attn_act = nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x (N, L, C)``, ``context (N, M, C_ctx)`` or None (self-attention) → ``(N, L, C)``."""
        ctx = x if context is None else context
        n, length, c = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], h, c // h).transpose(1, 2)

        q = self.q_act(split(self.to_q(x)))
        k = self.k_act(split(self.to_k(ctx)))
        v = self.v_act(split(self.to_v(ctx)))
        probs = self.attn_act(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(n, length, c)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    """LayerNorm pre-norm self-attention, cross-attention to the prompt, GELU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, ff_mult: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(), nn.Linear(dim * ff_mult, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 ``proj_in``, one :class:`TransformerBlock` over the H·W tokens, 1x1 ``proj_out``."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(dim), dim)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.block = TransformerBlock(dim, context_dim, heads)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, c, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        h = self.block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(n, c, hh, ww))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``(N, C, H, W)`` → ``(N, C_out, H/2, W/2)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then 3x3 conv: ``(N, C, H, W)`` → ``(N, C_out, 2H, 2W)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """UNet encoder level: ResBlock (+ SpatialTransformer), then an optional stride-2 downsample.

    Returns ``(skip, h)``: the level feature ``(N, C, H, W)`` and the input of the next level
    (``(N, C_next, H/2, W/2)``, or ``skip`` itself at the last level).
    """

    def __init__(self, cin: int, cout: int, cnext: int | None, temb_dim: int, attn: bool,
                 context_dim: int, heads: int) -> None:
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim)
        self.attn = SpatialTransformer(cout, context_dim, heads) if attn else None
        self.down = Downsample(cout, cnext) if cnext is not None else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x, context)
        return x, (x if self.down is None else self.down(x))


class UpLevel(nn.Module):
    """UNet decoder level: concat the skip, ResBlock (+ SpatialTransformer), optional ×2 upsample."""

    def __init__(self, cin: int, cskip: int, cout: int, cprev: int | None, temb_dim: int, attn: bool,
                 context_dim: int, heads: int) -> None:
        super().__init__()
        self.res = ResBlock(cin + cskip, cout, temb_dim)
        self.attn = SpatialTransformer(cout, context_dim, heads) if attn else None
        self.up = Upsample(cout, cprev) if cprev is not None else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.res(torch.cat([x, skip], dim=1), temb)
        if self.attn is not None:
            x = self.attn(x, context)
        return x if self.up is None else self.up(x)


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, ch: int, temb_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.res1 = ResBlock(ch, ch, temb_dim)
        self.attn = SpatialTransformer(ch, context_dim, heads)
        self.res2 = ResBlock(ch, ch, temb_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, temb), context), temb)

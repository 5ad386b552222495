"""One-step diffusion SR: Stable Diffusion's noise schedule, the one-step (x0) update and the pipeline mixin.

Models of the ``one-step-diffusion`` family (:data:`quantsr_cli.models.ARCHS`; the contract is in
:mod:`quantsr_cli.diffusion`) run through :class:`OneStepSRMixin`.

OSEDiff runs its UNet once at a fixed timestep ``T`` on the LR latent ``z_L`` and takes the
predicted clean latent ``z_H = (z_L - sqrt(1 - abar_T) * eps) / sqrt(abar_T)``. A quantization
error ``d_eps`` of the UNet output therefore reaches the latent multiplied by
``sqrt(1 - abar_T) / sqrt(abar_T)`` — 14.6 at ``T = 999`` and 1.61 at ``T = 499`` for SD's
scaled-linear schedule. Timestep retraining (TRQ) exploits exactly this factor.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from quantsr_cli.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


@lru_cache(maxsize=4)
def _alphas_cumprod_tuple(num_steps: int, beta_start: float, beta_end: float) -> tuple[float, ...]:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    return tuple(torch.cumprod(1.0 - betas, dim=0).tolist())


def alphas_cumprod(
    num_steps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> torch.Tensor:
    """Cumulative products ``abar_t`` of SD's "scaled_linear" schedule.

    Betas are ``linspace(sqrt(beta_start), sqrt(beta_end), num_steps) ** 2`` (diffusers'
    ``scaled_linear``); computed in float64.

    Returns:
        float64 tensor of shape ``(num_steps,)``, decreasing from ~0.99915 to ~0.00466.
    """
    return torch.tensor(_alphas_cumprod_tuple(num_steps, beta_start, beta_end), dtype=torch.float64)


def alpha_bar(t: int) -> float:
    """``abar_t`` for an integer timestep ``t`` in ``[0, 999]``."""
    if not 0 <= int(t) < NUM_TRAIN_TIMESTEPS:
        raise ConfigError(f"timestep {t} is outside [0, {NUM_TRAIN_TIMESTEPS - 1}]")
    return _alphas_cumprod_tuple(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)[int(t)]


def amplification_factor(t: int) -> float:
    """Error amplification ``sqrt(1 - abar_t) / sqrt(abar_t)`` of the one-step x0 update.

    A UNet-output error ``d_eps`` becomes a latent error ``amplification_factor(t) * d_eps``.
    Values: 14.6 at t=999, 1.61 at t=499, 0.69 at t=249, 0.041 at t=1.
    """
    a = alpha_bar(t)
    return math.sqrt(1.0 - a) / math.sqrt(a)


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """One-step denoise ``z_H = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)``.

    Args:
        z_t: latent ``(N, C, h, w)`` (the encoded LR image, any range).
        eps: predicted noise, same shape.
        t: the fixed timestep in ``[0, 999]``.

    Returns:
        predicted clean latent, same shape and dtype as ``z_t``.
    """
    a = alpha_bar(t)
    return (z_t - math.sqrt(1.0 - a) * eps) / math.sqrt(a)


class OneStepSRMixin:
    """The one-step SR pipeline shared by ``OSDSRTiny`` and ``OSEDiffAdapter``.

    The class provides ``encode(lr)``, ``denoise(z_L)``, ``decode(z_H)`` and the attributes
    ``timestep``, ``size_multiple`` and ``upscale``; this mixin adds ``latents`` and ``forward``.
    """

    timestep: int
    size_multiple: int
    upscale: int

    def latents(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_L, eps, z_H)`` for an LR batch whose sizes are multiples of ``size_multiple``."""
        z_l = self.encode(lr)  # type: ignore[attr-defined]
        eps = self.denoise(z_l)  # type: ignore[attr-defined]
        return z_l, eps, x0_from_eps(z_l, eps, self.timestep)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """LR ``(N, 3, h, w)`` in [0, 1] → SR ``(N, 3, h·upscale, w·upscale)`` (~[0, 1], unclamped);
        sizes that are not multiples of ``size_multiple`` are replicate-padded, then cropped."""
        h, w = lr.shape[-2:]
        m = self.size_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            lr = F.pad(lr, (0, pw, 0, ph), mode="replicate")
        out = self.decode(self.latents(lr)[2])  # type: ignore[attr-defined]
        return out[..., : h * self.upscale, : w * self.upscale]

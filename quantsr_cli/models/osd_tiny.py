"""``osd-sr-tiny``: a small one-step diffusion SR model in the OSEDiff shape, trainable on a CPU.

Pipeline (OSEDiff, one step at the fixed timestep ``T``, default 999)::

    x   = bicubic_up(LR, upscale) * 2 - 1                 # (N, 3, sH, sW) in [-1, 1]
    z_L = vae.encoder(x) * scaling_factor                   # (N, 4, sH/4, sW/4)
    eps = unet(z_L, T, empty_prompt)                        # same shape
    z_H = (z_L - sqrt(1 - abar_T) eps) / sqrt(abar_T)       # one-step x0 update
    SR  = (vae.decoder(z_H / scaling_factor) + 1) / 2        # (N, 3, sH, sW), ~[0, 1], unclamped

The VAE is a small conv encoder/decoder (/4 latent, 4 channels); the UNet has 3 levels with
ResBlocks, a sinusoidal time embedding and SpatialTransformers (self-attention + cross-attention to
a constant "empty prompt" buffer, like PassionSR's precomputed empty-prompt embedding) at the
lowest level and in the mid block. Unlike OSEDiff (SD-2.1 weights + LoRA) it is trained from scratch
by :func:`quantsr_cli.diffusion.train_tiny.train_osd_tiny`. Registered as ``osd-sr-tiny`` in
:data:`quantsr_cli.models.ARCHS` (family ``one-step-diffusion``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.errors import ConfigError
from quantsr_cli.models.common import check_float, check_int, check_int_list
from quantsr_cli.models.onestep import OneStepSRMixin
from quantsr_cli.models.spec import ArchSpec
from quantsr_cli.models.osd_blocks import DownLevel, MidBlock, ResBlock, UpLevel, _groups, timestep_embedding

ARCH = "osd-sr-tiny"


class TinyEncoder(nn.Module):
    """``(N, 3, H, W)`` in [-1, 1] → latent ``(N, latent, H / 2**(len(ch)-1), ...)``."""

    def __init__(self, channels: tuple[int, ...], latent: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(channels):
            blocks.append(ResBlock(c, c))
            if i + 1 < len(channels):
                blocks.append(nn.Conv2d(c, channels[i + 1], 3, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(channels[-1]), channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], latent, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class TinyDecoder(nn.Module):
    """Latent ``(N, latent, h, w)`` → image ``(N, 3, h * 2**(len(ch)-1), ...)`` in ~[-1, 1]."""

    def __init__(self, channels: tuple[int, ...], latent: int) -> None:
        super().__init__()
        rev = tuple(reversed(channels))
        self.conv_in = nn.Conv2d(latent, rev[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, c in enumerate(rev):
            blocks.append(ResBlock(c, c))
            if i + 1 < len(rev):
                blocks += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, rev[i + 1], 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(rev[-1]), rev[-1])
        self.conv_out = nn.Conv2d(rev[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z)))))


class TinyVAE(nn.Module):
    def __init__(self, channels: tuple[int, ...], latent: int) -> None:
        super().__init__()
        self.encoder = TinyEncoder(channels, latent)
        self.decoder = TinyDecoder(channels, latent)


class TinyUNet(nn.Module):
    """Noise predictor ``eps(z, t, context)``: ``(N, C_lat, h, w)`` → same shape (h, w divisible by
    ``2**(levels-1)``)."""

    def __init__(self, latent: int, channels: tuple[int, ...], attn_levels: tuple[int, ...],
                 context_dim: int, heads: int) -> None:
        super().__init__()
        c = channels
        temb = 4 * c[0]
        self.time_embed = nn.Sequential(nn.Linear(c[0], temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(latent, c[0], 3, padding=1)
        n = len(c)
        self.down = nn.ModuleList(
            DownLevel(c[i], c[i], c[i + 1] if i + 1 < n else None, temb, i in attn_levels, context_dim, heads)
            for i in range(n))
        self.mid = MidBlock(c[-1], temb, context_dim, heads)
        self.up = nn.ModuleList(
            UpLevel(c[i], c[i], c[i], c[i - 1] if i > 0 else None, temb, i in attn_levels, context_dim, heads)
            for i in range(n))
        self.out = nn.Sequential(nn.GroupNorm(_groups(c[0]), c[0]), nn.SiLU(), nn.Conv2d(c[0], latent, 3, padding=1))
        self.base_channels = c[0]

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(timestep_embedding(t, self.base_channels))
        h = self.conv_in(z)
        skips = []
        for level in self.down:
            skip, h = level(h, temb, context)
            skips.append(skip)
        h = self.mid(h, temb, context)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h, skips[i], temb, context)
        return self.out(h)


class OSDSRTiny(OneStepSRMixin, nn.Module):
    """The ``osd-sr-tiny`` model: LR ``(N, 3, H, W)`` in [0, 1] → SR ``(N, 3, sH, sW)`` (unclamped).

    Any LR size works (edge-padded internally to a multiple of ``size_multiple``).
    """

    def __init__(self, upscale: int = 4, latent_channels: int = 4, vae_channels: tuple[int, ...] = (16, 32, 64),
                 unet_channels: tuple[int, ...] = (32, 64, 96), attn_levels: tuple[int, ...] = (2,),
                 heads: int = 4, context_dim: int = 64, context_len: int = 8, timestep: int = 999,
                 scaling_factor: float = 1.0) -> None:
        upscale, vae_channels, unet_channels, attn_levels = _check_hparams(
            upscale, latent_channels, vae_channels, unet_channels, attn_levels, heads, context_dim, context_len,
            timestep, scaling_factor)
        super().__init__()
        self.arch = ARCH
        self.hparams = {"upscale": upscale, "latent_channels": latent_channels, "vae_channels": list(vae_channels),
                        "unet_channels": list(unet_channels), "attn_levels": list(attn_levels), "heads": heads,
                        "context_dim": context_dim, "context_len": context_len, "timestep": int(timestep),
                        "scaling_factor": scaling_factor}
        self.upscale = upscale
        self.timestep = int(timestep)
        self.scaling_factor = scaling_factor
        self.vae = TinyVAE(tuple(vae_channels), latent_channels)
        self.unet = TinyUNet(latent_channels, tuple(unet_channels), tuple(attn_levels), context_dim, heads)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("empty_prompt", torch.randn(1, context_len, context_dim, generator=gen))
        self.size_multiple = max(1, 2 ** (len(vae_channels) - 1) * 2 ** (len(unet_channels) - 1) // upscale)
        n = len(unet_channels)
        self.quant_patterns: tuple[str, ...] = ("vae.*", "unet.*")
        self.keep_patterns: tuple[str, ...] = ("vae.encoder.conv_in", "vae.encoder.conv_out", "unet.time_embed.*",
                                               "unet.conv_in", "unet.out.2", "vae.decoder.conv_in",
                                               "vae.decoder.conv_out")
        self.lora_patterns: tuple[str, ...] = ("unet.*",)
        self.denoiser_prefix = "unet"
        self._chain = (["vae.encoder", ("unet.time_embed", "unet.conv_in")] + [f"unet.down.{i}" for i in range(n)]
                       + ["unet.mid"] + [f"unet.up.{i}" for i in reversed(range(n))] + ["unet.out", "vae.decoder"])

    def set_timestep(self, t: int) -> None:
        """Change the fixed one-step timestep (TRQ); updates ``hparams`` too."""
        self.timestep = int(t)
        self.hparams["timestep"] = int(t)

    def rpq_modules(self) -> list[str | tuple[str, ...]]:
        """The module chain in forward-execution order (tuples are grouped modules)."""
        return list(self._chain)

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        """LR ``(N, 3, H, W)`` in [0, 1] (sizes multiple of ``size_multiple``) → ``z_L``."""
        x = F.interpolate(lr, scale_factor=float(self.upscale), mode="bicubic", align_corners=False)
        return self.vae.encoder(x.clamp(0, 1) * 2 - 1) * self.scaling_factor

    def denoise(self, z_l: torch.Tensor) -> torch.Tensor:
        """Predicted noise ``eps`` at the fixed timestep, same shape as ``z_l``."""
        t = torch.full((z_l.shape[0],), self.timestep, device=z_l.device, dtype=torch.long)
        return self.unet(z_l, t, self.empty_prompt.expand(z_l.shape[0], -1, -1))

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        """``z_H`` → image in ~[0, 1] (unclamped)."""
        return (self.vae.decoder(z_h / self.scaling_factor) + 1) * 0.5


def _check_hparams(upscale: object, latent: object, vae: object, unet: object, attn: object, heads: object,
                   context_dim: object, context_len: object, timestep: object, scaling: object) -> tuple:
    """Types and upper bounds of the builder arguments, checked before any module is built (metadata is
    untrusted: see :mod:`quantsr_cli.packing.checks`)."""
    check_int("upscale", upscale, maximum=8)
    check_int("latent_channels", latent, maximum=64)
    vae_l = check_int_list("vae_channels", vae, max_len=6, maximum=2048)
    unet_l = check_int_list("unet_channels", unet, max_len=6, maximum=2048)
    if isinstance(attn, (str, bytes)) or not isinstance(attn, (list, tuple)) or len(attn) > len(unet_l):
        raise ConfigError(f"attn_levels={attn!r} must be a list of UNet level indices")
    attn_l = [check_int(f"attn_levels[{i}]", a, minimum=0, maximum=len(unet_l) - 1) for i, a in enumerate(attn)]
    check_int("heads", heads, maximum=64)
    check_int("context_dim", context_dim, maximum=4096)
    check_int("context_len", context_len, maximum=1024)
    check_int("timestep", timestep, minimum=0, maximum=999)
    check_float("scaling_factor", scaling, maximum=1e3)
    return upscale, vae_l, unet_l, attn_l


def _no_detect(state_dict: object) -> None:
    """osd-sr-tiny files are quantsr safetensors with metadata; a bare state dict is never guessed as one."""
    return None


SPEC = ArchSpec(
    name="osd-sr-tiny",
    builder=OSDSRTiny,
    description="one-step diffusion SR (OSEDiff-shaped, small, CPU-trained)",
    detect=_no_detect,
    quant_rule=lambda model: tuple(model.quant_patterns),  # the layers QArtSR (quantsr diffusion) quantizes
    family="one-step-diffusion",
)

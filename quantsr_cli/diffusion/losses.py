"""Losses of the QArtSR stages: a pluggable perceptual term and the FP-distillation image loss.

QArtSR's extended training uses ``a1 * LPIPS(I_q, I_fp) + a2 * ||I_q - I_fp||^2``. LPIPS needs ImageNet
VGG/AlexNet backbones that torchvision downloads on first use; when they are not already on disk
(``$TORCH_HOME/hub/checkpoints``) we use a clearly named stand-in, :class:`SSIMGradLoss`
(``1 - SSIM`` + L1 of image gradients), which is **not LPIPS** and is never reported as such.
Images are ``(N, 3, H, W)`` in ~[0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.errors import ConfigError

STANDIN_NAME = "ssim+grad (stand-in, not LPIPS)"
_VGG16_FILE = "vgg16-397923af.pth"


def _gaussian_window(size: int = 11, sigma: float = 1.5, device: torch.device | None = None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :])[None, None]


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable per-pixel SSIM (11x11 Gaussian, sigma 1.5, per channel, 'valid' border).

    Args:
        a, b: ``(N, C, H, W)`` with H, W >= 11, values in ``[0, data_range]``.

    Returns:
        ``(N, C, H - 10, W - 10)`` SSIM values in [-1, 1].
    """
    c = a.shape[1]
    win = _gaussian_window(device=a.device).to(a.dtype).expand(c, 1, 11, 11)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, win, groups=c), F.conv2d(b, win, groups=c)
    saa = F.conv2d(a * a, win, groups=c) - mu_a**2
    sbb = F.conv2d(b * b, win, groups=c) - mu_b**2
    sab = F.conv2d(a * b, win, groups=c) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))


class SSIMGradLoss(nn.Module):
    """Stand-in perceptual loss ``(1 - SSIM) + L1(grad a, grad b)``; **not LPIPS**."""

    name = STANDIN_NAME

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a, b (N, 3, H, W)`` in [0, 1] → scalar (0 when equal)."""
        loss = a.new_zeros(())
        if min(a.shape[-2:]) >= 11:
            loss = loss + (1.0 - ssim_map(a, b).mean())
        gx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
        gy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
        return loss + gx.abs().mean() + gy.abs().mean()


def lpips_available(net: str = "vgg") -> bool:
    """True when the ``lpips`` package imports and its torchvision backbone weights are on disk."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    if net != "vgg":
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / _VGG16_FILE).is_file()


class LPIPSLoss(nn.Module):
    """Real LPIPS-VGG (frozen); only built when :func:`lpips_available` is true."""

    name = "lpips-vgg"

    def __init__(self) -> None:
        super().__init__()
        import lpips

        self.net = lpips.LPIPS(net="vgg", verbose=False).eval()
        self.net.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a * 2 - 1, b * 2 - 1).mean()


def make_perceptual(kind: str = "auto") -> nn.Module:
    """The perceptual term: ``"lpips"`` (required), ``"standin"``, or ``"auto"`` (LPIPS when its
    weights are present, else the stand-in). The module's ``name`` says which one it is."""
    if kind == "standin" or (kind == "auto" and not lpips_available()):
        return SSIMGradLoss()
    if kind in ("lpips", "auto"):
        if not lpips_available():
            raise ConfigError("perceptual='lpips' needs the lpips package and torchvision VGG16 weights "
                              f"({_VGG16_FILE}) in $TORCH_HOME/hub/checkpoints")
        return LPIPSLoss()
    raise ConfigError(f"perceptual={kind!r}; choose auto, lpips or standin")


def image_loss(out_q: torch.Tensor, out_fp: torch.Tensor, perceptual: nn.Module | None, a1: float,
               a2: float) -> torch.Tensor:
    """``a1 * perceptual(out_q, out_fp) + a2 * mean((out_q - out_fp)^2)`` (images in ~[0, 1])."""
    loss = a2 * F.mse_loss(out_q, out_fp)
    if perceptual is not None and a1 > 0:
        loss = loss + a1 * perceptual(out_q, out_fp.detach())
    return loss


def relative_mse(outs_q: list[torch.Tensor], outs_fp: list[torch.Tensor]) -> torch.Tensor:
    """Mean over tensor pairs of ``||q - fp||^2 / ||fp||^2`` (module loss, scale-free across modules)."""
    if not outs_q:
        raise ValueError("relative_mse needs at least one tensor pair")
    total = outs_q[0].new_zeros(())
    for q, fp in zip(outs_q, outs_fp):
        total = total + F.mse_loss(q, fp) / (fp.detach().pow(2).mean() + 1e-8)
    return total / len(outs_q)

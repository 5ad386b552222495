"""Image data for the diffusion engine: uint8 RGB images, aligned training patches, benchmarks.

Built on :mod:`quantsr_cli.data` (cv2 image io and the MATLAB-exact bicubic ``imresize``). Arrays are
``uint8 (H, W, 3)`` RGB; tensors ``float32 (N, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantsr_cli.data import imresize_uint8, read_image
from quantsr_cli.data import list_images as _list_images
from quantsr_cli.errors import DatasetError, ImageError


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``uint8 (H, W, 3)`` RGB (grayscale files are replicated to 3 channels)."""
    img = read_image(path)
    return (img.rgb[0] * 255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of ``folder``; raises :class:`DatasetError` when missing or empty."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError("not a folder", folder)
    files = _list_images(folder)
    if not files:
        raise DatasetError("no images found", folder)
    return files


def imresize_down(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(img, 1/scale, 'bicubic')`` of a ``uint8 (H, W, 3)`` image whose sides are
    multiples of ``scale`` (uint8 rounding after each pass, as MATLAB)."""
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ImageError(f"image {w}x{h} is not a multiple of scale {scale}")
    return imresize_uint8(img, 1.0 / scale)


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """``uint8 (H, W, 3)`` → ``float32 (1, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div(255.0)[None]


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` or ``(3, H, W)`` float in ~[0, 1] → ``uint8 (H, W, 3)`` (clamped, rounded)."""
    t = t.detach().squeeze(0).clamp(0, 1).mul(255.0).round()
    return t.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@dataclass
class PairedImages:
    """HR images (mod-cropped) and their MATLAB-bicubic LR versions, kept in memory as uint8."""

    hr: list[np.ndarray]
    lr: list[np.ndarray]
    scale: int

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path], scale: int = 4, min_size: int = 0) -> PairedImages:
        hrs, lrs = [], []
        for folder in folders:
            for path in list_images(folder):
                hr = mod_crop(read_rgb(path), scale)
                if min(hr.shape[:2]) < min_size:
                    continue
                hrs.append(hr)
                lrs.append(imresize_down(hr, scale))
        if not hrs:
            raise DatasetError("no usable training images", ", ".join(map(str, folders)))
        return cls(hrs, lrs, scale)

    def sample(self, batch: int, patch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random aligned patches with flips/rot90: ``lr (N, 3, p/s, p/s)``, ``hr (N, 3, p, p)`` in [0, 1]."""
        s = self.scale
        lp = patch // s
        lrs, hrs = [], []
        for _ in range(batch):
            i = int(rng.integers(len(self.hr)))
            lr_img, hr_img = self.lr[i], self.hr[i]
            y = int(rng.integers(lr_img.shape[0] - lp + 1))
            x = int(rng.integers(lr_img.shape[1] - lp + 1))
            lp_ = lr_img[y : y + lp, x : x + lp]
            hp = hr_img[y * s : (y + lp) * s, x * s : (x + lp) * s]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            lp_, hp = np.rot90(lp_, k), np.rot90(hp, k)
            if flip:
                lp_, hp = lp_[:, ::-1], hp[:, ::-1]
            lrs.append(lp_.transpose(2, 0, 1))
            hrs.append(hp.transpose(2, 0, 1))
        lr_t = torch.from_numpy(np.ascontiguousarray(np.stack(lrs))).float().div(255.0)
        hr_t = torch.from_numpy(np.ascontiguousarray(np.stack(hrs))).float().div(255.0)
        return lr_t, hr_t


def load_benchmark(root: str | Path, name: str, scale: int = 4) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(stem, lr uint8, hr uint8 mod-cropped)]`` from ``root/name/{HR, LR_bicubic/X<s>}`` (EDSR layout)."""
    base = Path(root) / name
    out = []
    for hr_path in list_images(base / "HR"):
        lr_path = base / "LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}{hr_path.suffix}"
        if not lr_path.is_file():
            raise DatasetError(f"missing LR file for {hr_path.name}", lr_path)
        hr, lr = mod_crop(read_rgb(hr_path), scale), read_rgb(lr_path)
        if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
            raise DatasetError(f"LR {lr.shape[:2]} does not match HR {hr.shape[:2]} at x{scale}", lr_path)
        out.append((hr_path.stem, lr, hr))
    return out

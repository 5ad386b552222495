"""Training patches: random aligned HR/LR crops, reproducible from ``(seed, iteration)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from quantsr_cli.data.imresize import matlab_lr
from quantsr_cli.data.io import image_error_reason, list_images, read_image
from quantsr_cli.errors import ConfigError, DatasetError, ImageError

__all__ = ["TrainDataset"]


def _mix(*values: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x >> 1


def check_patch_size(patch_size: int, scale: int) -> None:
    """ConfigError unless the HR ``patch_size`` (pixels) is a whole number of LR pixels at ``scale``."""
    if patch_size % scale:
        raise ConfigError(f"patch_size={patch_size} must be a multiple of scale={scale}")


class TrainDataset(torch.utils.data.Dataset):
    """Random HR/LR training patches from folders of HR images, reproducible from ``(seed, iteration)``.

    All HR images are decoded once and kept in memory as uint8 (16-bit files are rounded to 8-bit
    levels; the 291-image T91+BSD200 set is ~100 MB), cropped to a multiple of ``scale``. The LR of
    each *whole* image is made once with the MATLAB bicubic (:func:`matlab_lr`, uint8, bit-exact
    with the benchmark LR files), so training LR has the same statistics as test LR, with no
    patch-border artefacts and no per-step resize cost (~20 ms per 480x320 image at start-up, on one
    thread). A patch is an aligned crop of both (HR offset a multiple of ``scale``), then the same
    random hflip / vflip / transpose (rot90) on both -- exact, since the bicubic kernel and the
    integer-factor grid are symmetric.

    Images smaller than ``patch_size`` in either side (51 of T91's 91 at 192 px): ``small="skip"``
    (default) leaves them out (listed in :attr:`skipped`); ``small="pad"`` extends them by symmetric
    (mirror) padding at the bottom/right before making their LR.

    Args:
        folders: HR image folders and/or image files.
        scale: integer SR factor; ``patch_size`` must be a multiple of it.
        patch_size: HR patch side in pixels.
        seed: base seed; batches depend only on ``(seed, iteration)``.
        augment: random flips and transpose.
        small: ``"skip"`` or ``"pad"``, see above.

    Raises:
        DatasetError: missing folder, unreadable image, or no usable image.
        ConfigError: ``patch_size`` not a multiple of ``scale``, or unknown ``small``.
    """

    def __init__(
        self,
        folders: list[str | Path] | tuple[str | Path, ...],
        scale: int,
        patch_size: int = 192,
        seed: int = 0,
        augment: bool = True,
        small: str = "skip",
    ) -> None:
        check_patch_size(patch_size, scale)
        if small not in ("skip", "pad"):
            raise ConfigError(f"small={small!r}; choose 'skip' or 'pad'")
        self.scale, self.patch_size, self.seed, self.augment = int(scale), int(patch_size), int(seed), augment
        self.epoch = 0
        self.files: list[Path] = []
        self.skipped: list[Path] = []
        self.hr: list[torch.Tensor] = []
        self.lr: list[torch.Tensor] = []
        files: list[Path] = []
        for f in folders:
            p = Path(f).expanduser()
            if p.is_dir():
                found = list_images(p)
                if not found:
                    raise DatasetError("no images in training folder", p)
                files += found
            elif p.is_file():
                files.append(p)
            else:
                raise DatasetError("training folder not found", p)
        # Many small element-wise ops: one thread is as fast, and immune to the 10-30x slowdown
        # OpenMP threads suffer when another process holds a core.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for f in files:
                self._add(f, small)
        finally:
            torch.set_num_threads(threads)
        if not self.hr:
            raise DatasetError(
                f"all {len(files)} training images are smaller than patch_size={patch_size}; "
                "use a smaller patch or small='pad'"
            )

    def _add(self, path: Path, small: str) -> None:
        try:
            img = read_image(path)
        except ImageError as exc:
            raise DatasetError(f"unreadable training image: {image_error_reason(exc)}", path) from None
        hr = (img.rgb[0] * 255.0).round().to(torch.uint8)
        p, s = self.patch_size, self.scale
        h, w = hr.shape[-2:]
        if h < p or w < p:
            if small == "skip":
                self.skipped.append(path)
                return
            pad = ((0, 0), (0, max(0, p - h)), (0, max(0, p - w)))
            hr = torch.from_numpy(np.pad(hr.numpy(), pad, mode="symmetric"))
        h, w = hr.shape[-2] // s * s, hr.shape[-1] // s * s
        hr = hr[:, :h, :w].contiguous()
        self.files.append(path)
        self.hr.append(hr)
        self.lr.append(matlab_lr(hr.to(torch.int32), s).to(torch.uint8))

    def __len__(self) -> int:
        return len(self.hr)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch mixed into :meth:`__getitem__`'s per-item seed."""
        self.epoch = int(epoch)

    def _patch(self, index: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(3, p/s, p/s)`` and ``(3, p, p)`` views of an aligned random crop, augmented."""
        hr, lr = self.hr[index], self.lr[index]
        s, lp = self.scale, self.patch_size // self.scale
        ty = int(torch.randint(0, lr.shape[-2] - lp + 1, (1,), generator=g))
        tx = int(torch.randint(0, lr.shape[-1] - lp + 1, (1,), generator=g))
        lr_p = lr[:, ty : ty + lp, tx : tx + lp]
        hr_p = hr[:, ty * s : (ty + lp) * s, tx * s : (tx + lp) * s]
        if self.augment:
            hflip, vflip, rot = (torch.rand(3, generator=g) < 0.5).tolist()
            if hflip:
                lr_p, hr_p = lr_p.flip(-1), hr_p.flip(-1)
            if vflip:
                lr_p, hr_p = lr_p.flip(-2), hr_p.flip(-2)
            if rot:
                lr_p, hr_p = lr_p.transpose(-2, -1), hr_p.transpose(-2, -1)
        return lr_p, hr_p

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch pair of image ``index``: ``(lr (3, p/s, p/s), hr (3, p, p))`` float32 in [0, 1].

        Deterministic in ``(seed, epoch, index)`` (see :meth:`set_epoch`).
        """
        g = torch.Generator().manual_seed(_mix(self.seed, 1, self.epoch, index))
        lr, hr = self._patch(index % len(self.hr), g)
        return lr.float().div_(255.0), hr.float().div_(255.0)

    def sample_batch(self, iteration: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch, a pure function of ``(seed, iteration, batch_size)`` (exact resume).

        Images are drawn uniformly with replacement, then a random aligned crop and augmentation.

        Args:
            iteration: optimizer step index (0-based or 1-based, the caller's convention).
            batch_size: number of patches.

        Returns:
            ``(lr, hr)``: float32 ``(B, 3, p/s, p/s)`` and ``(B, 3, p, p)`` in ``[0, 1]``.
        """
        g = torch.Generator().manual_seed(_mix(self.seed, 2, iteration))
        pairs = [
            self._patch(int(torch.randint(0, len(self.hr), (1,), generator=g)), g) for _ in range(batch_size)
        ]
        lr = torch.stack([p[0] for p in pairs]).float().div_(255.0)
        hr = torch.stack([p[1] for p in pairs]).float().div_(255.0)
        return lr, hr

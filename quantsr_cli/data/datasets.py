"""Dataset lookup and benchmark (paired HR/LR) datasets; :class:`TrainDataset` is re-exported from :mod:`.training`.

Benchmark layout (EDSR/BasicSR packages)::

    <root>/<Name>/HR/<stem>.png
    <root>/<Name>/LR_bicubic/X<s>/<stem>x<s>.png      (Manga109 packages: <stem>_LRBI_x<s>.png)

A flat folder of images (e.g. ``val/DIV2K256``) is accepted as HR-only. When the ``LR_bicubic/X<s>``
folder is absent, LR images are made like the MATLAB benchmark scripts -- HR cropped to a multiple of
``s``, ``imresize(HR, 1/s, 'bicubic')`` on uint8 (rounded after each pass) -- which reproduces the
shipped Set5/Set14 LR files bit for bit. They are cached under :func:`cache_dir` (never inside the
dataset folder, which may be read-only or checksummed), written atomically, and regenerated when the
HR file is newer than the cached one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from quantsr_cli.data.imresize import matlab_lr
from quantsr_cli.data.headers import header_size
from quantsr_cli.data.io import image_error_reason, list_images, read_image, write_image
from quantsr_cli.data.training import TrainDataset
from quantsr_cli.errors import DatasetError, ImageError
from quantsr_cli.fileio import remove_stale_temp_files
from quantsr_cli.paths import DATA_ENV, data_dir, default_data_dir

__all__ = [
    "BENCHMARKS", "shared_data_dir", "no_data_hint", "data_root_default", "cache_dir", "resolve_dataset", "list_images",
    "BenchmarkDataset", "TrainDataset",
]

BENCHMARKS = ("Set5", "Set14", "B100", "Urban100", "Manga109")
"""Standard SR test sets, resolved by name (case-insensitive; ``BSD100``/``BSDS100`` = ``B100``)."""

_ALIASES = {"bsd100": "b100", "bsds100": "b100"}
_CACHE_VERSION = "lr-v1"


def shared_data_dir() -> Path | None:
    """The data folder (:func:`quantsr_cli.paths.data_dir`): ``$QUANTSR_DATA`` if set, else the per-user
    data folder if it exists, else None. Never relative to the current directory."""
    if os.environ.get(DATA_ENV):
        return data_dir()
    default = default_data_dir()
    return default if default.is_dir() else None


def no_data_hint() -> str:
    """The end of a "no data" error: where quantsr looked and how to fix it."""
    return (f"no data folder at {data_dir()} (set {DATA_ENV} or put the datasets there; "
            "`quantsr data check` shows the layout, docs/data.md where to get them)")


def data_root_default() -> Path | None:
    """Default benchmark root: ``<shared_data_dir()>/benchmarks``, or None when there is no data folder."""
    root = shared_data_dir()
    return None if root is None else root / "benchmarks"


def cache_dir() -> Path:
    """Cache root: ``$QUANTSR_CACHE``, else ``$XDG_CACHE_HOME/quantsr``, else ``~/.cache/quantsr``."""
    env = os.environ.get("QUANTSR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "quantsr"


def resolve_dataset(name_or_path: str | Path, data_root: str | Path | None = None) -> Path:
    """Find a dataset folder from a name (``Set5``, ``set14``, ``B100``...) or a path.

    Args:
        name_or_path: an existing folder, or a dataset name looked up case-insensitively in
            ``data_root``, ``data_root/benchmarks``, ``data_root/benchmark`` (EDSR's ``benchmark.tar``)
            and ``data_root/val`` (e.g. ``DIV2K256``).
        data_root: folder holding the datasets (a data folder or its ``benchmarks/``); default
            :func:`shared_data_dir`.

    Returns:
        The dataset folder (absolute).

    Raises:
        DatasetError: nothing found; the message says where it looked.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    name = str(name_or_path)
    if os.sep in name or (os.altsep and os.altsep in name):
        raise DatasetError("dataset folder not found", p)
    root = Path(data_root).expanduser() if data_root is not None else shared_data_dir()
    if root is None:
        raise DatasetError(f"dataset {name!r} is not a folder and there is {no_data_hint()}")
    wanted = {name.lower(), _ALIASES.get(name.lower(), name.lower())}
    wanted |= {k for k, v in _ALIASES.items() if v in wanted}
    for base in (root, root / "benchmarks", root / "benchmark", root / "val"):
        if base.is_dir():
            for child in sorted(base.iterdir()):
                if child.is_dir() and child.name.lower() in wanted:
                    return child.resolve()
    raise DatasetError(f"dataset {name!r} not found under {root} or its benchmarks/, benchmark/ and val/ folders "
                       f"(known names: {', '.join(BENCHMARKS)}; `quantsr data check` shows what is there)")


def _peek_size(path: Path) -> tuple[int, int] | None:
    """``(H, W)`` from the file header, or None when the format is not parsed cheaply."""
    try:
        with open(path, "rb") as fh:
            wh = header_size(fh.read(1 << 16))
    except OSError:
        return None
    return None if wh is None else (wh[1], wh[0])


def _to_uint(img_rgb: torch.Tensor, bit_depth: int) -> torch.Tensor:
    """``(1, 3, H, W)`` float in [0, 1] -> exact integer levels (int32 ``(3, H, W)``)."""
    peak = 65535.0 if bit_depth == 16 else 255.0
    return (img_rgb[0] * peak).round().to(torch.int32)


class BenchmarkDataset:
    """Paired HR/LR test images, in file-name order.

    Items are ``(name, lr, hr)``: ``name`` the HR file stem; ``lr`` float32 ``(1, 3, h, w)`` in
    ``[0, 1]``; ``hr`` float32 ``(1, 3, h*scale, w*scale)`` (HR cropped to a multiple of ``scale``,
    top-left kept). Grayscale files are replicated to 3 channels; alpha is ignored.

    Args:
        path: dataset folder (with ``HR/``, or a flat folder of HR images).
        scale: integer SR factor (2, 3, 4...).
        cache: LR cache root for generated LR images; default :func:`cache_dir`.

    Raises:
        DatasetError: missing folder, no images, HR/LR count mismatch, unmatched LR names, LR size
            different from ``floor(HR / scale)``, or an unreadable image (the file is named).
    """

    def __init__(self, path: str | Path, scale: int, cache: str | Path | None = None) -> None:
        self.path = Path(path)
        self.scale = int(scale)
        if self.scale < 1:
            raise DatasetError(f"scale must be a positive integer, got {scale}", self.path)
        if not self.path.is_dir():
            raise DatasetError("dataset folder not found", self.path)
        hr_dir = self.path / "HR" if (self.path / "HR").is_dir() else self.path
        self.hr_files = list_images(hr_dir)
        if not self.hr_files:
            raise DatasetError("no HR images (expected HR/*.png or images in the folder)", hr_dir)
        self.lr_dir = self._find_lr_dir()
        self.generated = self.lr_dir is None
        if self.lr_dir is None:
            key = hashlib.sha1(str(self.path.resolve()).encode("utf-8")).hexdigest()[:12]
            root = Path(cache).expanduser() if cache is not None else cache_dir()
            self.lr_dir = root / _CACHE_VERSION / f"{self.path.name}-{key}" / f"X{self.scale}"
            self.lr_files = [self.lr_dir / f"{f.stem}x{self.scale}.png" for f in self.hr_files]
            remove_stale_temp_files(self.lr_dir)  # left by a run killed while caching (no-op if absent)
        else:
            self.lr_files = self._pair(self.lr_dir)
            self._check_sizes()

    @property
    def names(self) -> list[str]:
        """HR file stems, in item order."""
        return [f.stem for f in self.hr_files]

    def __len__(self) -> int:
        return len(self.hr_files)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, torch.Tensor]:
        hr_file = self.hr_files[i]
        hr = self._read(hr_file)
        if self.generated:
            lr = self._generated_lr(i, hr)
        else:
            lr = self._read(self.lr_files[i]).rgb
        s = self.scale
        h, w = lr.shape[-2:]
        if (h, w) != (hr.rgb.shape[-2] // s, hr.rgb.shape[-1] // s):
            raise DatasetError(
                f"LR size {w}x{h} is not floor(HR {hr.rgb.shape[-1]}x{hr.rgb.shape[-2]} / {s})", self.lr_files[i]
            )
        return hr_file.stem, lr, hr.rgb[..., : h * s, : w * s].contiguous()

    # ------------------------------------------------------------------ helpers

    def _find_lr_dir(self) -> Path | None:
        for sub in (f"X{self.scale}", f"x{self.scale}"):
            cand = self.path / "LR_bicubic" / sub
            if cand.is_dir():
                return cand
        return None

    def _pair(self, lr_dir: Path) -> list[Path]:
        lr_all = list_images(lr_dir)
        if len(lr_all) != len(self.hr_files):
            raise DatasetError(f"HR/LR count mismatch: {len(self.hr_files)} HR vs {len(lr_all)} LR images", lr_dir)
        by_stem = {f.stem: f for f in lr_all}
        s = self.scale
        pairs, missing = [], []
        for hr in self.hr_files:
            match = next(
                (by_stem[t] for t in (f"{hr.stem}x{s}", f"{hr.stem}_LRBI_x{s}", hr.stem) if t in by_stem), None
            )
            if match is None:
                missing.append(hr.name)
            pairs.append(match)
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise DatasetError(
                f"no LR image (<stem>x{s}, <stem>_LRBI_x{s} or <stem>) for {len(missing)} HR images: {shown}", lr_dir
            )
        return pairs

    def _check_sizes(self) -> None:
        s = self.scale
        for hr, lr in zip(self.hr_files, self.lr_files):
            hs, ls = _peek_size(hr), _peek_size(lr)
            if hs is not None and ls is not None and ls != (hs[0] // s, hs[1] // s):
                raise DatasetError(f"LR size {ls[1]}x{ls[0]} is not floor(HR {hs[1]}x{hs[0]} / {s})", lr)

    @staticmethod
    def _read(path: Path):
        try:
            return read_image(path)
        except ImageError as exc:
            raise DatasetError(f"unreadable image: {image_error_reason(exc)}", path) from None

    def _generated_lr(self, i: int, hr) -> torch.Tensor:
        cached, hr_file = self.lr_files[i], self.hr_files[i]
        s = self.scale
        want = (hr.rgb.shape[-2] // s, hr.rgb.shape[-1] // s)
        try:
            if cached.stat().st_mtime >= hr_file.stat().st_mtime:
                img = read_image(cached)
                if tuple(img.rgb.shape[-2:]) == want:
                    return img.rgb
        except (OSError, ImageError):
            pass
        if min(want) < 1:
            raise DatasetError(f"HR image is smaller than the scale factor {s}", hr_file)
        peak = 65535 if hr.bit_depth == 16 else 255
        levels = matlab_lr(_to_uint(hr.rgb, hr.bit_depth), s, peak)
        lr = (levels.to(torch.float32) / float(peak))[None]
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_image(cached, lr, bit_depth=hr.bit_depth, gray=hr.gray)
        except (OSError, ImageError):
            pass  # a cache we cannot write only costs time
        return lr

"""The datasets quantsr knows by name, and the check of a data folder behind ``quantsr data check``.

A data folder (``$QUANTSR_DATA``, see :mod:`quantsr_cli.paths`) is laid out as::

    benchmarks/<Name>/HR/*.png                      Set5, Set14, B100, Urban100, Manga109
    benchmarks/<Name>/LR_bicubic/X<s>/*.png         optional: made with the MATLAB bicubic when absent
    train/<Name>/*.png                              DIV2K, Flickr2K, T91, BSD200 (or your own folders)
    weights/IMDN_x4.pth                             pretrained weights the imdn presets start from

:func:`check_data_root` reads only folder listings and the first bytes of each image (its header), so it
is quick even for DIV2K; it never decodes an image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantsr_cli.data.datasets import BenchmarkDataset, resolve_dataset
from quantsr_cli.data.imagesize import header_size
from quantsr_cli.data.io import list_images
from quantsr_cli.errors import ConfigError, DatasetError

__all__ = ["KNOWN", "DatasetInfo", "CheckRow", "check_data_root", "known_names"]

STATUSES = ("ok", "missing", "malformed")


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset quantsr knows: its folder name (and the names its archives extract to), its role
    (``benchmark`` for eval/validation, ``train`` for quantize) and its number of HR images."""

    name: str
    kind: str
    images: int
    aliases: tuple[str, ...] = ()


KNOWN: tuple[DatasetInfo, ...] = (
    DatasetInfo("Set5", "benchmark", 5),
    DatasetInfo("Set14", "benchmark", 14),
    DatasetInfo("B100", "benchmark", 100, ("BSD100", "BSDS100")),
    DatasetInfo("Urban100", "benchmark", 100),
    DatasetInfo("Manga109", "benchmark", 109),
    DatasetInfo("DIV2K", "train", 800, ("DIV2K_train_HR",)),
    DatasetInfo("Flickr2K", "train", 2650, ("Flickr2K_HR",)),
    DatasetInfo("T91", "train", 91, ("yang91",)),
    DatasetInfo("BSD200", "train", 200),
)
"""Every dataset ``quantsr data check`` reports by name (docs/data.md says where each comes from)."""

WEIGHTS = ("IMDN_x2.pth", "IMDN_x3.pth", "IMDN_x4.pth")
"""Pretrained files the bundled ``imdn_*`` presets read from ``<data>/weights``."""


@dataclass(frozen=True)
class CheckRow:
    """One line of the report: ``status`` is ``ok``, ``missing`` or ``malformed``; ``images`` the HR
    images found; ``detail`` a short human explanation (what is there, or what is wrong)."""

    name: str
    kind: str
    status: str
    path: str | None
    images: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def known_names() -> list[str]:
    """The dataset names of :data:`KNOWN`, in order."""
    return [d.name for d in KNOWN]


def _info(name: str) -> DatasetInfo:
    wanted = name.lower()
    for info in KNOWN:
        if wanted in (info.name.lower(), *(a.lower() for a in info.aliases)):
            return info
    raise ConfigError(f"unknown dataset {name!r}; choose from {', '.join(known_names())}")


def _unreadable(files: Sequence[Path]) -> list[Path]:
    """Files whose header does not give an image size (not an image, empty, or cut short)."""
    bad = []
    for f in files:
        try:
            with open(f, "rb") as fh:
                if header_size(fh.read(1 << 16)) is None:
                    bad.append(f)
        except OSError:
            bad.append(f)
    return bad


def _images_row(info: DatasetInfo, folder: Path, hr_dir: Path) -> tuple[str, int, list[str]]:
    """Status, image count and detail words of a folder of HR images."""
    files = list_images(hr_dir)
    if not files:
        below = sorted(p for p in hr_dir.iterdir() if p.is_dir() and list_images(p)) if hr_dir.is_dir() else []
        where = f"; found images in {below[0].name}/: move them up one level" if below else ""
        return "malformed", 0, [f"no images in {hr_dir.relative_to(folder.parent)}/{where}"]
    bad = _unreadable(files)
    if bad:
        return "malformed", len(files), [f"{len(bad)} of {len(files)} files are not readable images "
                                         f"(first: {bad[0].name})"]
    words = [f"{len(files)} images"]
    if info.images and len(files) != info.images:
        if info.kind == "benchmark":  # a partial test set gives numbers no paper can be compared with
            return "malformed", len(files), [f"{len(files)} HR images, the standard set has {info.images}"]
        words.append(f"(the standard set has {info.images})")
    return "ok", len(files), words


def _check_benchmark(info: DatasetInfo, root: Path) -> CheckRow:
    try:
        path = resolve_dataset(info.name, root)
    except DatasetError:
        return CheckRow(info.name, info.kind, "missing", None, 0, "not found under benchmarks/")
    hr_dir = path / "HR" if (path / "HR").is_dir() else path
    status, count, words = _images_row(info, path, hr_dir)
    if status == "ok":
        have = []
        for scale in (2, 3, 4):
            if (path / "LR_bicubic" / f"X{scale}").is_dir() or (path / "LR_bicubic" / f"x{scale}").is_dir():
                try:
                    BenchmarkDataset(path, scale)
                except DatasetError as exc:
                    return CheckRow(info.name, info.kind, "malformed", str(path), count, f"LR x{scale}: {exc}")
                have.append(f"x{scale}")
        words.append(f"LR {' '.join(have)}" if have else "no LR files (made from HR on first use and cached)")
    return CheckRow(info.name, info.kind, status, str(path), count, ", ".join(words))


def _train_folder(root: Path, names: Sequence[str]) -> Path | None:
    train = root / "train"
    if not train.is_dir():
        return None
    wanted = {n.lower() for n in names}
    return next((p for p in sorted(train.iterdir()) if p.is_dir() and p.name.lower() in wanted), None)


def _check_train(info: DatasetInfo, root: Path) -> CheckRow:
    path = _train_folder(root, (info.name, *info.aliases))
    if path is None:
        return CheckRow(info.name, info.kind, "missing", None, 0, "not found under train/")
    status, count, words = _images_row(info, path, path)
    return CheckRow(info.name, info.kind, status, str(path), count, " ".join(words))


def _check_weights(root: Path) -> CheckRow:
    folder = root / "weights"
    have = [w for w in WEIGHTS if (folder / w).is_file()]
    status = "ok" if "IMDN_x4.pth" in have else "missing"
    detail = ", ".join(have) if have else "IMDN_x4.pth not found (the imdn_* presets start from it)"
    return CheckRow("IMDN weights", "weights", status, str(folder) if have else None, 0, detail)


def _other_train_folders(root: Path) -> list[CheckRow]:
    """Folders under ``train/`` that are not known datasets: ``quantize`` trains on them too by default."""
    train = root / "train"
    if not train.is_dir():
        return []
    known = {n.lower() for d in KNOWN for n in (d.name, *d.aliases)}
    rows = []
    for path in sorted(p for p in train.iterdir() if p.is_dir() and p.name.lower() not in known):
        info = DatasetInfo(path.name, "train", 0)
        status, count, words = _images_row(info, path, path)
        rows.append(CheckRow(path.name, "other", status, str(path), count, words[0] + (
            " (used by quantize by default)" if status == "ok" else "")))
    return rows


def check_data_root(root: str | Path, names: Sequence[str] = ()) -> list[CheckRow]:
    """One :class:`CheckRow` per known dataset (or per name in ``names``), the IMDN weights and any
    other training folder; ``names`` are matched case-insensitively, aliases included.

    Raises:
        ConfigError: a name that is not a known dataset.
    """
    root = Path(root).expanduser()
    infos = [_info(n) for n in names] if names else list(KNOWN)
    rows = [_check_benchmark(i, root) if i.kind == "benchmark" else _check_train(i, root) for i in infos]
    if not names:
        rows += [_check_weights(root), *_other_train_folders(root)]
    return rows

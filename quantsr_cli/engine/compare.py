"""``quantsr eval --compare-dir``: side-by-side zoomed crops of HR, bicubic and each model, with PSNR.

Per image one PNG: panels of the same crop (a square of a quarter of the shorter HR side around the
pixel where the last model's error (the model being judged) is largest after blurring, so the crop shows a hard region)
scaled up with nearest-neighbour to ``panel`` pixels, each labelled with its name and Y-PSNR.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from quantsr_cli.data.datasets import BenchmarkDataset, resolve_dataset
from quantsr_cli.data.imresize import imresize
from quantsr_cli.data.io import tensor_to_uint8
from quantsr_cli.engine.evaluate import pair_metrics
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.engine.outputs import clean_temp_files
from quantsr_cli.engine.tiling import upscale_tensor
from quantsr_cli.errors import ImageError, NumericError
from quantsr_cli.fileio import atomic_write


def _crop_box(hr: np.ndarray, sr: np.ndarray, size: int) -> tuple[int, int]:
    err = cv2.GaussianBlur(np.abs(hr.astype(np.float32) - sr.astype(np.float32)).mean(axis=2), (0, 0), size / 4)
    cy, cx = np.unravel_index(int(np.argmax(err)), err.shape)
    top = int(np.clip(cy - size // 2, 0, hr.shape[0] - size))
    left = int(np.clip(cx - size // 2, 0, hr.shape[1] - size))
    return top, left


def _panel(img: np.ndarray, top: int, left: int, size: int, panel: int, label: str) -> np.ndarray:
    crop = img[top : top + size, left : left + size]
    big = cv2.resize(crop, (panel, panel), interpolation=cv2.INTER_NEAREST)
    bar = np.full((28, panel, 3), 255, np.uint8)
    cv2.putText(bar, label, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, big], axis=0)


def write_comparisons(
    models: list[LoadedModel], dataset: str, out_dir: str | Path, *, data_root: str | None = None,
    panel: int = 256, max_images: int = 0,
) -> list[Path]:
    """Write one comparison PNG per image of ``dataset`` into ``out_dir``; returns the paths.

    ``models`` must share one scale; each gets a panel labelled ``label PSNR dB``.
    """
    scale = models[0].scale
    path = resolve_dataset(dataset, data_root)
    data = BenchmarkDataset(path, scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_temp_files(out)
    written = []
    for index, (name, lr, hr) in enumerate(data):
        if max_images and index >= max_images:
            break
        hr_img = tensor_to_uint8(hr)
        panels_src: list[tuple[str, np.ndarray]] = []
        bic = imresize(lr, scale).clamp(0, 1)
        psnr, _ = pair_metrics(bic, hr, scale, path / name)
        panels_src.append((f"bicubic {psnr:.2f} dB", tensor_to_uint8(bic)))
        for loaded in models:
            device = next(iter(loaded.model.parameters()), torch.empty(0)).device
            try:
                sr = upscale_tensor(loaded.model, lr.to(device), scale).cpu()
            except NumericError as exc:
                raise NumericError(f"{exc} for {path.name}/{name}", loaded.source) from None
            psnr, _ = pair_metrics(sr, hr, scale, path / name)
            panels_src.append((f"{loaded.label.split(' (')[0]} {psnr:.2f} dB", tensor_to_uint8(sr)))
        h, w = hr_img.shape[:2]
        size = max(16, min(h, w) // 4)
        top, left = _crop_box(hr_img[: panels_src[-1][1].shape[0], : panels_src[-1][1].shape[1]],
                              panels_src[-1][1], size)
        row = [_panel(hr_img, top, left, size, panel, "HR")]
        row += [_panel(img, top, left, size, panel, label) for label, img in panels_src]
        canvas = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0)), constant_values=255) for p in row], axis=1)
        target = out / f"{path.name}_{name}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        if ok:
            try:
                atomic_write(target, buf.tobytes())
            except OSError as exc:
                raise ImageError(f"cannot write file ({exc.strerror or exc})", target) from None
            written.append(target)
    return written

"""``quantsr eval``: PSNR/SSIM on benchmark folders exactly as BasicSR computes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantsr_cli.data.datasets import BenchmarkDataset, resolve_dataset
from quantsr_cli.data.imresize import imresize
from quantsr_cli.data.io import tensor_to_uint8, write_image
from quantsr_cli.engine.modelio import LoadedModel, resolve_model_path
from quantsr_cli.engine.outputs import check_outputs, clean_temp_files
from quantsr_cli.engine.tiling import upscale_tensor
from quantsr_cli.errors import DatasetError, NumericError, QuantSRError
from quantsr_cli.metrics.psnr_ssim import evaluate_pair

EventFn = Callable[[dict[str, Any]], None]


@dataclass
class DatasetResult:
    """Mean and per-image PSNR (dB, Y channel) and SSIM of one dataset, plus the bicubic baseline."""

    name: str
    psnr: float
    ssim: float
    images: dict[str, dict[str, float]] = field(default_factory=dict)
    bicubic: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "images": self.images, "bicubic": self.bicubic}


def pair_metrics(sr: torch.Tensor, hr: torch.Tensor, scale: int, where: Path) -> tuple[float, float]:
    """:func:`~quantsr_cli.metrics.psnr_ssim.evaluate_pair`, with images it cannot measure (smaller than
    SSIM's window after the border crop, SR larger than HR) reported as a DatasetError naming ``where``."""
    try:
        return evaluate_pair(sr, hr, scale)
    except ValueError as exc:
        raise DatasetError(f"cannot measure this image: {exc}", where) from None


def evaluate_model(
    loaded: LoadedModel,
    dataset: str,
    *,
    data_root: str | None = None,
    tile: int = 0,
    save_dir: str | Path | None = None,
    bicubic: bool = True,
    max_images: int = 0,
    on_event: EventFn | None = None,
    on_sr: Callable[[str, str, torch.Tensor], None] | None = None,
) -> DatasetResult:
    """Evaluate ``loaded`` on one benchmark dataset (name like ``Set5`` or a folder path).

    Each SR output is rounded to uint8 before the metrics (BasicSR ``tensor2img``); PSNR/SSIM are on
    the Y channel with ``scale`` border pixels cropped. ``max_images`` > 0 limits the images (validation).
    ``on_sr(dataset, image, sr)`` receives each SR output, ``(1, 3, H, W)`` in about ``[0, 1]``, on the CPU.
    """
    path = resolve_dataset(dataset, data_root)
    data = BenchmarkDataset(path, loaded.scale)
    device = next(iter(loaded.model.parameters()), torch.empty(0)).device
    images: dict[str, dict[str, float]] = {}
    bic_psnr: list[float] = []
    bic_ssim: list[float] = []
    total = len(data) if max_images <= 0 else min(len(data), max_images)
    for index, (name, lr, hr) in enumerate(data):
        if index >= total:
            break
        try:
            sr = upscale_tensor(loaded.model, lr.to(device), loaded.scale, tile=tile).cpu()
        except NumericError as exc:
            raise NumericError(f"{exc} for {path.name}/{name}", loaded.source) from None
        psnr, ssim = pair_metrics(sr, hr, loaded.scale, path / name)
        images[name] = {"psnr": psnr, "ssim": ssim}
        if on_sr is not None:
            on_sr(path.name, name, sr)
        if bicubic:
            up = imresize(lr, loaded.scale).clamp(0, 1)
            bp, bs = pair_metrics(up, hr, loaded.scale, path / name)
            bic_psnr.append(bp)
            bic_ssim.append(bs)
        if save_dir is not None:
            out = Path(save_dir) / path.name / f"{name}.png"
            if index == 0:
                out.parent.mkdir(parents=True, exist_ok=True)
                clean_temp_files(out.parent)  # left by an earlier run killed while writing here
            write_image(out, sr)
        if on_event:
            on_event({"event": "image", "dataset": path.name, "name": name, "index": index + 1,
                      "total": total, "psnr": psnr, "ssim": ssim})
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    result = DatasetResult(
        name=path.name,
        psnr=mean([v["psnr"] for v in images.values()]),
        ssim=mean([v["ssim"] for v in images.values()]),
        images=images,
    )
    if bicubic:
        result.bicubic = {"psnr": mean(bic_psnr), "ssim": mean(bic_ssim)}
    return result


def check_eval_outputs(
    models: list[str],
    datasets: list[str],
    *,
    scale: int,
    data_root: str | None = None,
    save_dir: str | Path | None = None,
    compare_dir: str | Path | None = None,
) -> None:
    """Refuse, before any work, outputs that would land in a dataset folder or on an input or each other.

    ``--save-dir`` writes ``<save_dir>/<dataset>/<stem>.png`` and ``--compare-dir`` writes
    ``<compare_dir>/<dataset>_<stem>.png`` for every image of every dataset.
    """
    if save_dir is None and compare_dir is None:
        return
    outputs: list[tuple[Path, str]] = []
    protected: list[tuple[Path, str]] = []
    inputs: list[tuple[Path, str]] = []
    for source in models:
        try:
            inputs.append((resolve_model_path(source), "model"))
        except QuantSRError:
            pass
    for name in datasets:
        path = resolve_dataset(name, data_root)
        protected.append((path, "dataset folder"))
        data = BenchmarkDataset(path, scale)
        inputs += [(f, "image") for f in data.hr_files]
        if not data.generated:
            inputs += [(f, "image") for f in data.lr_files]
        for stem in data.names:
            if save_dir is not None:
                outputs.append((Path(save_dir) / path.name / f"{stem}.png", "--save-dir image"))
            if compare_dir is not None:
                outputs.append((Path(compare_dir) / f"{path.name}_{stem}.png", "--compare-dir image"))
    check_outputs(outputs, inputs, protected)


def run_eval(
    loaded: LoadedModel,
    datasets: list[str],
    *,
    data_root: str | None = None,
    tile: int = 0,
    save_dir: str | None = None,
    on_event: EventFn | None = None,
) -> dict[str, Any]:
    """Evaluate on several datasets; returns the ``--json`` object of ``quantsr eval``."""
    results = {}
    for name in datasets:
        res = evaluate_model(loaded, name, data_root=data_root, tile=tile, save_dir=save_dir, on_event=on_event)
        results[res.name] = res.to_dict()
    return {"model": loaded.source, "label": loaded.label, "scale": loaded.scale, "datasets": results}


__all__ = ["DatasetResult", "evaluate_model", "run_eval", "tensor_to_uint8"]

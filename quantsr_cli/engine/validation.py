"""Validation during training: the PSNR validator, its images, and the checks done before any work.

With ``save_val_images = N`` each validation writes the SR output of the first ``N`` images as
``<run-dir>/visualization/<dataset>/<image>_<iter>.png`` (BasicSR's ``save_img`` layout), so a run can be
watched converging image by image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantsr_cli.data import BenchmarkDataset, resolve_dataset
from quantsr_cli.data.io import write_image
from quantsr_cli.engine.evaluate import evaluate_model
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.engine.outputs import clean_temp_files

Validator = Callable[[nn.Module, "int | None"], float]


def check_val_dataset(dataset: str, scale: int) -> None:
    """Find and check the validation set now, so that a wrong name fails before data loading and training."""
    BenchmarkDataset(resolve_dataset(dataset), scale)


def make_validator(scale: int, dataset: str, max_images: int, arch: str, *, run_dir: Path | None = None,
                   save_images: int = 0) -> Validator:
    """``(model, iteration) -> mean Y-PSNR`` on the validation dataset (BasicSR conventions).

    With ``save_images > 0`` and an ``iteration`` (not None), the first ``save_images`` SR outputs are
    written under ``run_dir/visualization``.
    """
    folder = run_dir / "visualization" if run_dir is not None else None

    def validate(model: nn.Module, iteration: int | None = None) -> float:
        loaded = LoadedModel(model=model, arch=arch, scale=scale, kind="qat", source="training")
        written: list[Path] = []

        def save(dataset_name: str, image: str, sr: torch.Tensor) -> None:
            if folder is None or iteration is None or len(written) >= save_images:
                return
            out = folder / dataset_name / f"{image}_{iteration}.png"
            if not written:
                out.parent.mkdir(parents=True, exist_ok=True)
                clean_temp_files(out.parent)
            written.append(write_image(out, sr.clamp(0, 1)))

        return evaluate_model(loaded, dataset, bicubic=False, max_images=max_images,
                              on_sr=save if save_images > 0 else None).psnr

    return validate

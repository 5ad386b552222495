"""Optional TensorBoard logging of a training run (``--tensorboard``): the scalars of ``train_log.jsonl``.

``torch.utils.tensorboard`` needs the ``tensorboard`` package, which quantsr does not install; asking for
TensorBoard without it is a one-line error before any work. Tags: ``train/loss``, ``train/lr``,
``train/it_s``, ``val/psnr`` (and ``val/psnr_raw`` with an EMA), indexed by iteration.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from quantsr_cli.errors import ConfigError

MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"


def require_tensorboard() -> None:
    """ConfigError when the ``tensorboard`` package is not installed (checked without importing it)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(MISSING)


def summary_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` writing into ``log_dir`` (tests replace this factory)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(MISSING) from None
    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLog:
    """A trainer event sink that writes the training and validation scalars (module docstring)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = summary_writer(log_dir)

    def __call__(self, event: dict[str, Any]) -> None:
        kind, step = event.get("event"), event.get("iter")
        if kind == "train":
            for key in ("loss", "lr", "it_s"):
                if event.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", event[key], step)
        elif kind == "val":
            for key in ("psnr", "psnr_raw"):
                if event.get(key) is not None:
                    self.writer.add_scalar(f"val/{key}", event[key], step)
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""Shared fixtures: the shared data folder, tiny training sets, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """``$QUANTSR_DATA`` or ``../shared/data`` next to the repository."""
    env = os.environ.get("QUANTSR_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _export_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runtime backends cache their exports here (and CLI subprocesses inherit it), not in ~/.cache."""
    os.environ.setdefault("QUANTSR_CACHE", str(tmp_path_factory.mktemp("quantsr-cache")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; also exported as ``$QUANTSR_DATA`` so the package's own default finds it."""
    root = data_dir()
    if not (root / "benchmarks" / "Set5" / "HR").is_dir():
        pytest.skip(f"shared data not found at {root} (set QUANTSR_DATA)")
    os.environ.setdefault("QUANTSR_DATA", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_train_dir(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four T91 images, enough for patch sizes up to 64."""
    out = tmp_path_factory.mktemp("train")
    for name in ("t1.png", "t2.png", "t3.png", "t5.png"):
        shutil.copy(shared_data / "train" / "T91" / name, out / name)
    return out


def calibrated_qat(arch: str, hparams: dict, method: str, w_bits: int, a_bits: int, seed: int = 0) -> torch.nn.Module:
    """A small ``arch`` model (``hparams``) quantized and calibrated on one random batch, so its quantizers
    have non-trivial steps and shifts (eval mode)."""
    from quantsr_cli.config import QuantConfig
    from quantsr_cli.models import build_model
    from quantsr_cli.quant import quantize_

    torch.manual_seed(seed)
    model = quantize_(build_model(arch, **hparams), QuantConfig(method, w_bits, a_bits))
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    return model.eval()


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run ``python -m quantsr_cli ARGS`` in a subprocess (one torch thread)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": str(data_dir()), **(env or {})}
    full_env.pop("QUANTSR_DEBUG", None) if env is None or "QUANTSR_DEBUG" not in env else None
    return subprocess.run([sys.executable, "-m", "quantsr_cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)

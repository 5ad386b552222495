"""Fixtures of the robustness corpus: a forking CLI runner, tiny model files, and assertion helpers.

Every corpus case runs the real ``quantsr`` entry point in its own child process (see
:mod:`.forkcli`); the interruption and load tests start plain ``python -m quantsr_cli`` processes.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from .forkcli import CliServer
from .helpers import write_png


@pytest.fixture(scope="session")
def cli() -> CliServer:
    """``cli(*args, cwd=..., env=...) -> Result``: one ``quantsr`` run in a fresh child process."""
    server = CliServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small calibrated quantsr-c models (16 features, 1 block unless named otherwise).

    ``packed`` / ``qat`` / ``fp``: x2 W4A4; ``fp_x4``: an x4 FP file; ``pth_x3``: a foreign x3
    ``.pth`` state dict; ``student`` (qat W2A2, 2 blocks) and ``teacher`` (fp, 2 blocks): x2 for distill;
    ``student4``: qat W2A2 with 4 blocks for slim.
    """
    from quantsr_cli.config import QuantConfig
    from quantsr_cli.models import build_model
    from quantsr_cli.packing import io as packing_io
    from quantsr_cli.quant import quantize_

    folder = tmp_path_factory.mktemp("models")

    def qat(blocks: int, bits: int) -> tuple[torch.nn.Module, QuantConfig]:
        config = QuantConfig("rbd", bits, bits)
        model = quantize_(build_model("quantsr-c", upscale=2, num_block=blocks, num_feat=16), config)
        model.train()
        with torch.no_grad():
            model(torch.rand(2, 3, 16, 16))  # lazy quantizer initialisation
        return model.eval(), config

    torch.manual_seed(0)
    files = {name: folder / f"{name}.safetensors" for name in
             ("packed", "qat", "fp", "fp_x4", "student", "teacher", "student4")}
    model, config = qat(1, 4)
    packing_io.save_model(model, files["qat"], config)
    packing_io.save_model(model, files["packed"], config, pack=True)
    packing_io.save_model(build_model("quantsr-c", upscale=2, num_block=1, num_feat=16), files["fp"])
    packing_io.save_model(build_model("quantsr-c", upscale=4, num_block=1, num_feat=16), files["fp_x4"])
    model, config = qat(2, 2)
    packing_io.save_model(model, files["student"], config)
    packing_io.save_model(build_model("quantsr-c", upscale=2, num_block=2, num_feat=16), files["teacher"])
    model, config = qat(4, 2)
    packing_io.save_model(model, files["student4"], config)
    files["pth_x3"] = folder / "x3.pth"
    torch.save({"params": build_model("quantsr-c", upscale=3, num_block=1, num_feat=16).state_dict()}, files["pth_x3"])
    return files


@pytest.fixture(scope="session")
def small_train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 HR training images (synthetic, so the corpus does not need the shared data)."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(7)
    for i in range(2):
        base = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
        write_png(folder / f"t{i}.png", cv2.resize(base, (64, 64), interpolation=cv2.INTER_CUBIC))
    return folder


@pytest.fixture(scope="session")
def baseline_rss(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> float:
    """Peak RSS (MiB) of an ordinary ``upscale`` of a small image with a tiny model: what a refused file may cost."""
    from .memory import peak_rss

    folder = tmp_path_factory.mktemp("baseline")
    src = write_png(folder / "in.png", np.zeros((12, 16, 3), np.uint8))
    result, rss = peak_rss("upscale", str(src), "-o", str(folder / "out.png"), "--model", str(tiny_models["fp"]))
    assert result.returncode == 0, result.stderr
    return rss


@pytest.fixture(scope="session")
def diffusion_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny ``osd-sr-tiny`` x4 files (8 channels): ``fp`` (kind diffusion-fp) and ``qat`` (diffusion-qat, W4A4)."""
    from quantsr_cli.diffusion.ckpt import save_model
    from quantsr_cli.diffusion.qmodel import QuantSpec, quantize_model
    from quantsr_cli.models import build_model

    folder = tmp_path_factory.mktemp("diffusion")
    hparams = dict(vae_channels=[8, 8], unet_channels=[8, 8], attn_levels=[1], heads=2, context_dim=8, context_len=2)
    torch.manual_seed(0)
    fp = save_model(build_model("osd-sr-tiny", **hparams), folder / "fp.safetensors")
    spec = QuantSpec(w_bits=4, a_bits=4)
    model = build_model("osd-sr-tiny", **hparams)
    quantize_model(model, spec)
    qat = save_model(model, folder / "qat.safetensors", spec=spec)
    return {"fp": fp, "qat": qat}

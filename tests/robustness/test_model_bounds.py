"""Memory is bounded by what a model file holds: hyperparameters are checked against the tensor shapes
(with upper bounds) before any module is built, and ``.pth`` archives declaring more data than they can
hold are refused before loading.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsr_cli.models import build_model
from quantsr_cli.packing import io as packing_io

from .helpers import error_line, write_png
from .memory import peak_rss

SLACK_MB = 64  # a refused file may cost this much more than an ordinary tiny run (allocator noise)


def remeta(src: Path, dst: Path, **changes: object) -> Path:
    """Copy a quantsr file with metadata values replaced (JSON-encoded unless already a string)."""
    tensors, meta = packing_io.read_file(src)
    for key, value in changes.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    packing_io.save_file(tensors, meta, dst)
    return dst


def _image(tmp_path: Path) -> Path:
    return write_png(tmp_path / "in.png", np.zeros((12, 16, 3), np.uint8))


def _refused_cheaply(tmp_path: Path, model: Path, baseline: float, *needles: str) -> float:
    result, rss = peak_rss("upscale", str(_image(tmp_path)), "-o", str(tmp_path / "out.png"), "--model", str(model))
    error_line(result, str(model), *needles)
    assert not (tmp_path / "out.png").exists()
    assert rss < baseline + SLACK_MB, (rss, baseline)
    return rss


def test_tiny_file_with_huge_num_block_is_refused_before_building(tmp_path: Path, baseline_rss: float) -> None:
    """A few hundred bytes of safetensors claiming a billion residual blocks."""
    tensors = {"conv_first.weight": torch.zeros(4, 3, 3, 3)}
    meta = {"kind": "fp", "arch": "quantsr-c", "scale": "4", "hparams": json.dumps({"num_block": 10**9, "upscale": 4})}
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(packing_io.serialize(tensors, meta))
    assert path.stat().st_size < 1024
    _refused_cheaply(tmp_path, path, baseline_rss, "num_block")


@pytest.mark.parametrize("hparams", [{"num_block": 1_000_000}, {"num_feat": 1024, "num_block": 8}])
def test_metadata_not_backed_by_tensors_is_refused(tiny_models, tmp_path: Path, baseline_rss: float,
                                                  hparams: dict) -> None:
    """The tensors are a 16-feature, 1-block model; the metadata claims a much larger one."""
    full = {"upscale": 2, "num_block": 1, "num_feat": 16, "res_scale": 1.0, "learnable_shortcut": True, **hparams}
    path = remeta(tiny_models["fp"], tmp_path / "claims.safetensors", hparams=full)
    _refused_cheaply(tmp_path, path, baseline_rss)


def test_diffusion_metadata_not_backed_by_tensors_is_refused(diffusion_models, tmp_path: Path,
                                                             baseline_rss: float) -> None:
    tensors, meta = packing_io.read_file(diffusion_models["fp"])
    hparams = {**json.loads(meta["hparams"]), "unet_channels": [4096, 4096, 4096], "vae_channels": [2048, 2048]}
    path = remeta(diffusion_models["fp"], tmp_path / "osd.safetensors", hparams=hparams)
    _refused_cheaply(tmp_path, path, baseline_rss)


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``.pth`` whose only storage record is 128 MiB of zeros, deflate-compressed to ~130 KB."""
    folder = tmp_path_factory.mktemp("zipbomb")
    plain = folder / "plain.pth"
    torch.save({"w": torch.zeros(4)}, plain)
    bomb = folder / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as fh:
                    chunk = bytes(1 << 20)
                    for _ in range(128):
                        fh.write(chunk)
            else:
                dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    return bomb


def test_pth_zip_bomb_is_refused_before_loading(zip_bomb: Path, tmp_path: Path, baseline_rss: float) -> None:
    assert zip_bomb.stat().st_size < 1_000_000
    _refused_cheaply(tmp_path, zip_bomb, baseline_rss, "MB")


def test_pth_storage_declared_beyond_the_file_is_refused(tmp_path: Path) -> None:
    """A legacy (pre-zip) ``.pth`` whose pickle declares a 4 GiB storage in a 400-byte file."""
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    at = data.find(b"K\x04N", data.find(b"cpu"))  # BININT1 4 (the element count), NONE
    assert at > 0
    data[at:at + 2] = b"J" + (2**30).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    result, _ = peak_rss("upscale", str(_image(tmp_path)), "-o", str(tmp_path / "out.png"), "--model", str(path))
    error_line(result, str(path), "declares")


def test_pth_views_larger_than_their_storage_are_refused(tmp_path: Path, baseline_rss: float) -> None:
    """Every tensor a broadcast view of a single float: a 1024-feature model in a few KB."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model("quantsr-c", upscale=2, num_block=2, num_feat=1024).state_dict().items()}
    path = tmp_path / "views.pth"
    torch.save({k: torch.zeros(1).expand(s) for k, s in shapes.items()}, path)
    assert path.stat().st_size < 100_000
    _refused_cheaply(tmp_path, path, baseline_rss, "storage")


def test_megabytes_of_metadata_json_are_refused_before_decoding(tiny_models, tmp_path: Path,
                                                                baseline_rss: float) -> None:
    """12 MB of JSON numbers in one metadata value would become ~100 MB of Python objects."""
    path = remeta(tiny_models["fp"], tmp_path / "chatty.safetensors", extra="[" + "1.5," * 3_000_000 + "1.5]")
    _refused_cheaply(tmp_path, path, baseline_rss, "metadata")

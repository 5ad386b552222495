"""Memory is bounded by what the header says, for every image format: the size (and the output size,
pixels x scale²) is checked before anything is decoded or allocated, in ``upscale``, ``eval`` datasets
and training folders.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from quantsr_cli.data.io import header_size

from .helpers import QUICK_TRAIN, error_line, fresh_dir, tree, write_png
from .image_files import HEADERS, png_header, tiff_bomb, tiff_header
from .memory import peak_rss

RGB = (np.random.default_rng(3).random((12, 16, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".webp", ".tif", ".tiff", ".bmp", ".dib", ".ppm", ".pnm", ".pam",
                                 ".pfm", ".sr", ".ras", ".hdr", ".pic", ".gif", ".avif", ".jp2"])
def test_header_size_matches_the_decoder_for_every_format(ext: str) -> None:
    """Whatever OpenCV can write, quantsr reads its size from the header, and it is the decoded size."""
    img = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    if ext in (".pfm", ".hdr", ".pic"):
        img = img.astype(np.float32) / 255
    try:
        ok, buf = cv2.imencode(ext, img)
    except cv2.error:
        ok = False
    if not ok:
        pytest.skip(f"this OpenCV build cannot write {ext}")
    decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    assert decoded is not None
    assert header_size(buf.tobytes()) == (decoded.shape[1], decoded.shape[0])


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_oversized_header_is_refused_before_decoding(cli, tiny_models, tmp_path: Path, name: str) -> None:
    """A file declaring 20000x20000 pixels is refused from its header, whatever the format."""
    src = tmp_path / name
    src.write_bytes(HEADERS[name](20000, 20000))
    out = fresh_dir(tmp_path / "out")
    result = cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(tiny_models["packed"]))
    error_line(result, str(src), "20000x20000", "megapixels", "--max-pixels")
    assert list(out.iterdir()) == []


def test_output_size_is_checked_from_the_header(cli, tiny_models, tmp_path: Path) -> None:
    """8000x8000 is within the 100-megapixel limit, but its x2 output (16000x16000) is not."""
    src = tmp_path / "big.png"
    src.write_bytes(png_header(8000, 8000))
    out = fresh_dir(tmp_path / "out")
    line = error_line(cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(tiny_models["packed"])),
                      str(src), "16000x16000", "megapixels")
    assert "output" in line
    assert list(out.iterdir()) == []


def test_dataset_and_training_folders_check_headers(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    ds = fresh_dir(tmp_path / "ds")
    write_png(ds / "a.png", np.tile(RGB, (3, 3, 1)))
    big = ds / "zz.tif"
    big.write_bytes(tiff_header(20000, 20000))
    before = tree(ds)
    result = cli("eval", "--model", str(tiny_models["packed"]), "--dataset", str(ds),
                 env={"QUANTSR_CACHE": str(tmp_path / "cache")})
    error_line(result, str(big), "megapixels")
    assert tree(ds) == before
    train = fresh_dir(tmp_path / "train")
    for f in small_train_dir.iterdir():
        (train / f.name).write_bytes(f.read_bytes())
    (train / "zz.tif").write_bytes(tiff_header(20000, 20000))
    result = cli("quantize", "--arch", "quantsr-c", "--blocks", "1", "--scale", "2", "--bits", "4",
                 "--train-data", str(train), "--run-dir", str(tmp_path / "run"), *QUICK_TRAIN)
    error_line(result, str(train / "zz.tif"), "megapixels")


@pytest.fixture(scope="module")
def tiff_bomb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16000x16000 8-bit gray (256 MB decoded) in a ~250 KB TIFF."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tif"
    path.write_bytes(tiff_bomb(16000, 16000))
    return path


def test_decompression_bomb_costs_no_memory(tiny_models, tiff_bomb_file: Path, tmp_path: Path,
                                            baseline_rss: float) -> None:
    assert tiff_bomb_file.stat().st_size < 1_000_000
    result, rss = peak_rss("upscale", str(tiff_bomb_file), "-o", str(tmp_path / "r.png"),
                           "--model", str(tiny_models["packed"]))
    error_line(result, str(tiff_bomb_file), "megapixels")
    assert rss < baseline_rss + 64, (rss, baseline_rss)  # the 256 MB image is never allocated
    assert not (tmp_path / "r.png").exists()

"""Bad and odd image inputs to ``quantsr upscale``: refused with one clear line, or handled correctly.

Refused inputs: exit 1, one ``error:`` line naming the file and the problem, no traceback, nothing
written (the output folder stays empty: no result, no temp file). Odd but valid inputs (1x1, smaller
than the tile pad, 16-bit, alpha, gray, non-UTF-8 names) must work and keep their format.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from .helpers import error_line, fresh_dir, is_root, read_any, write_png

RNG = np.random.default_rng(0)
RGB = (RNG.random((12, 16, 3)) * 255).astype(np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming ``width x height`` (no image data)."""
    ihdr = struct.pack(">II5B", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _float_tiff() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".tiff", RNG.random((8, 8, 3)).astype(np.float32))
    assert ok
    return buf.tobytes()


def _jpeg_bytes() -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", RGB)
    assert ok
    return buf.tobytes()


# name -> (file content, words the error line must contain)
BAD_IMAGES = {
    "empty.png": (lambda: b"", "empty file"),
    "truncated.png": (lambda: _png_bytes(RGB)[: len(_png_bytes(RGB)) // 2], "truncated"),
    "truncated.jpg": (lambda: _jpeg_bytes()[: len(_jpeg_bytes()) * 2 // 3], "truncated"),
    "text.png": (lambda: b"this is a text file, not a picture\n", "not a readable image"),
    "vector.svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "unsupported format"),
    "random.xyz": (lambda: RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(), "unsupported format"),
    "float32.tiff": (_float_tiff, "unsupported sample type"),
    "huge.png": (lambda: _png_header_only(20000, 20000), "20000x20000"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_refused_and_nothing_written(cli, tiny_models, tmp_path: Path, name: str) -> None:
    make, words = BAD_IMAGES[name]
    src = tmp_path / name
    src.write_bytes(make())
    out = fresh_dir(tmp_path / "out")
    previous = write_png(out / "result.png", RGB)  # an earlier result at the output path is not damaged
    before = previous.read_bytes()
    result = cli("upscale", str(src), "-o", str(previous), "--model", str(tiny_models["packed"]))
    error_line(result, str(src), words)
    assert [p.name for p in out.iterdir()] == ["result.png"] and previous.read_bytes() == before
    if name == "huge.png":  # the limit is documented in the message and can be raised
        error_line(result, "megapixels", "--max-pixels")


def test_pixel_limit_is_overridable(cli, tiny_models, tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(20000, 20000))
    out = fresh_dir(tmp_path / "out")
    model = str(tiny_models["packed"])
    # above the raised limit (the x2 output is 40000x40000 = 1.6 G pixels) the header passes; this file then
    # fails for what it really is
    raised = cli("upscale", str(huge), "-o", str(out / "r.png"), "--model", model, "--max-pixels", "2000000000")
    line = error_line(raised, str(huge))
    assert "megapixels" not in line
    small = write_png(tmp_path / "small.png", RGB)  # 16x12 = 192 pixels
    refused = cli("upscale", str(small), "-o", str(out / "s.png"), "--model", model, "--max-pixels", "100")
    error_line(refused, "16x12", "--max-pixels")
    assert list(out.iterdir()) == []
    unlimited = cli("upscale", str(small), "-o", str(out / "s.png"), "--model", model, "--max-pixels", "0")
    assert unlimited.returncode == 0, unlimited.stderr
    assert read_any(out / "s.png").shape == (24, 32, 3)


def test_missing_input_and_empty_folder(cli, tiny_models, tmp_path: Path) -> None:
    out = fresh_dir(tmp_path / "out")
    model = str(tiny_models["packed"])
    error_line(cli("upscale", str(tmp_path / "nope.png"), "-o", str(out), "--model", model), "nope.png", "no such file")
    empty = fresh_dir(tmp_path / "empty")
    (empty / "notes.txt").write_text("no images here")
    error_line(cli("upscale", str(empty), "-o", str(out), "--model", model), str(empty), "no images")
    assert list(out.iterdir()) == []


def _gray_alpha_png(gray: np.ndarray, alpha: np.ndarray) -> bytes:
    """An 8-bit gray+alpha PNG (colour type 4), which OpenCV cannot write."""
    h, w = gray.shape
    raw = b"".join(b"\x00" + np.stack([gray[y], alpha[y]], axis=1).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">II5B", w, h, 8, 4, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# name -> (array or bytes, extra CLI args, expected output shape, expected dtype)
ODD_IMAGES = {
    "one_pixel.png": (RGB[:1, :1], [], (2, 2, 3), np.uint8),
    "below_tile_pad.png": (RGB[:3, :5], ["--tile", "2", "--tile-pad", "8"], (6, 10, 3), np.uint8),
    "deep16.png": ((RNG.random((10, 12, 3)) * 65535).astype(np.uint16), [], (20, 24, 3), np.uint16),
    "rgba.png": ((RNG.random((10, 12, 4)) * 255).astype(np.uint8), [], (20, 24, 4), np.uint8),
    "rgba16.png": ((RNG.random((10, 12, 4)) * 65535).astype(np.uint16), [], (20, 24, 4), np.uint16),
    "gray.png": ((RNG.random((10, 12)) * 255).astype(np.uint8), [], (20, 24), np.uint8),
    "gray16.png": ((RNG.random((10, 12)) * 65535).astype(np.uint16), [], (20, 24), np.uint16),
    "gray_alpha.png": (_gray_alpha_png((RNG.random((10, 12)) * 255).astype(np.uint8),
                                       np.full((10, 12), 200, np.uint8)), [], (20, 24, 4), np.uint8),
    "photo.jpg": (RGB, [], (24, 32, 3), np.uint8),
}


@pytest.mark.parametrize("name", sorted(ODD_IMAGES))
def test_odd_but_valid_images_work(cli, tiny_models, tmp_path: Path, name: str) -> None:
    content, args, shape, dtype = ODD_IMAGES[name]
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        write_png(src, content)
    out = fresh_dir(tmp_path / "out")
    dst = out / f"result{src.suffix}"
    result = cli("upscale", str(src), "-o", str(dst), "--model", str(tiny_models["packed"]), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower()
    img = read_any(dst)
    assert img is not None and img.shape == shape and img.dtype == dtype
    if name == "gray_alpha.png":  # gray stays gray (R = G = B) and the constant alpha is kept
        assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
        assert np.all(np.abs(img[..., 3].astype(int) - 200) <= 1)
    assert sorted(p.name for p in out.iterdir()) == [dst.name]


def test_non_utf8_file_names(cli, tiny_models, tmp_path: Path) -> None:
    """Undecodable bytes in a file name: a good image is upscaled, a bad one is named in the error."""
    folder = fresh_dir(tmp_path / "in")
    raw = os.fsencode(folder)
    good = os.fsdecode(raw + b"/caf\xe9_\xff.png")
    bad = os.fsdecode(raw + b"/broken_\xfe.png")
    write_png(Path(good), RGB)
    Path(bad).write_bytes(b"")
    out = fresh_dir(tmp_path / "out")
    model = str(tiny_models["packed"])
    single = cli("upscale", good, "-o", str(out / "single.png"), "--model", model)
    assert single.returncode == 0, single.stderr
    assert read_any(out / "single.png").shape == (24, 32, 3)
    batch = cli("upscale", str(folder), "-o", str(out / "batch"), "--model", model)
    line = error_line(batch, "broken_", "empty file")
    assert "caf" not in line
    written = os.listdir(os.fsencode(out / "batch"))
    assert written == [b"caf\xe9_\xff.png"]  # the good one, under its own (byte) name
    assert read_any(Path(os.fsdecode(os.fsencode(out / "batch") + b"/" + written[0]))).shape == (24, 32, 3)


def test_unwritable_output(cli, tiny_models, tmp_path: Path) -> None:
    src = write_png(tmp_path / "in.png", RGB)
    model = str(tiny_models["packed"])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # the output's folder is a regular file
    error_line(cli("upscale", str(src), "-o", str(blocker / "out.png"), "--model", model), str(blocker))
    error_line(cli("upscale", str(src), str(src), "-o", str(blocker / "sub"), "--model", model), str(blocker))
    # a folder nobody may write into, root included (tests often run as root): /proc
    if Path("/proc/self").is_dir():
        line = error_line(cli("upscale", str(src), "-o", "/proc/quantsr_out.png", "--model", model), "/proc")
        assert "cannot write" in line or "not writable" in line
        error_line(cli("upscale", str(src), str(src), "-o", "/proc/quantsr_out_dir", "--model", model), "/proc")
        assert not Path("/proc/quantsr_out.png").exists()
    if not is_root():  # a read-only folder only blocks ordinary users
        ro = fresh_dir(tmp_path / "ro")
        ro.chmod(0o555)
        try:
            error_line(cli("upscale", str(src), "-o", str(ro / "out.png"), "--model", model), str(ro))
            assert list(ro.iterdir()) == []
        finally:
            ro.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.png"]


def test_output_equal_to_input_leaves_input_intact(cli, tiny_models, tmp_path: Path) -> None:
    folder = fresh_dir(tmp_path / "in")
    a = write_png(folder / "a.png", RGB)
    b = write_png(folder / "b.png", RGB[::-1])
    before = {p.name: p.read_bytes() for p in (a, b)}
    model = str(tiny_models["packed"])
    error_line(cli("upscale", str(a), "-o", str(a), "--model", model), str(a), "equals the input")
    # a folder upscaled into itself with no --suffix: every output would overwrite its input; the run is
    # refused before any work, with one line
    error_line(cli("upscale", str(folder), "-o", str(folder), "--model", model), "equals the input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

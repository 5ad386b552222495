"""Tests of quantsr_cli.data: image IO, MATLAB imresize, benchmark and training datasets."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantsr_cli.data import (
    BenchmarkDataset,
    TrainDataset,
    data_root_default,
    imresize,
    imresize_uint8,
    matlab_lr,
    read_image,
    resolve_dataset,
    shared_data_dir,
    tensor_to_uint8,
    write_image,
)
from quantsr_cli.data.imresize import contributions, cubic
from quantsr_cli.errors import ConfigError, DatasetError, ImageError

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("QUANTSR_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


DATA = _data_dir()
needs_data = pytest.mark.skipif(
    not (DATA / "benchmarks" / "Set5" / "HR").is_dir(),
    reason=f"benchmark data not found at {DATA} (set QUANTSR_DATA)",
)


def _u8(path: Path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)


def _rand_rgb(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g).float() / 255.0


# ----------------------------------------------------------------------------- imresize


def test_cubic_kernel_values():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], dtype=torch.float64)
    # Keys a=-0.5: 1, 0.5625, 0, -0.0625, 0, 0
    assert torch.allclose(cubic(x), torch.tensor([1, 0.5625, 0, -0.0625, 0, 0], dtype=torch.float64))


def test_contributions_symmetric_padding_and_normalisation():
    w, idx = contributions(4, 8, 2.0)  # upscale x2
    assert torch.allclose(w.sum(1), torch.ones(8, dtype=torch.float64))
    # first output pixel u = 0.75: taps at 1-based -1..2 mirror to 0-based 1,0,0,1 (+ dropped zero taps)
    assert idx.min() >= 0 and idx.max() <= 3
    # u = 0.75 -> distance 0.25 to pixel 1 (0-based 0) carries the largest weight
    assert idx[0, torch.argmax(w[0])] == 0


def test_imresize_constant_and_sizes():
    x = torch.full((2, 3, 30, 21), 0.3)
    y = imresize(x, 1 / 3)
    assert y.shape == (2, 3, 10, 7) and torch.allclose(y, torch.full_like(y, 0.3), atol=1e-6)
    assert imresize(x, 2.0).shape == (2, 3, 60, 42)
    assert imresize(x, size=(13, 17)).shape == (2, 3, 13, 17)
    assert imresize(torch.zeros(1, 1, 5, 5), 0.5).shape == (1, 1, 3, 3)  # ceil(5 * 0.5)
    with pytest.raises(TypeError):
        imresize(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 0.5)


def test_imresize_close_to_torch_antialias():
    x = _rand_rgb(64, 64).double()
    x = F.avg_pool2d(x, 3, 1, 1)  # smoother content, like photographs
    ours = imresize(x, 0.25)
    theirs = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    inner = (ours - theirs)[..., 3:-3, 3:-3].abs()  # borders differ: mirror vs truncated kernel
    assert inner.max() * 255 < 0.05


def test_imresize_uint8_layouts_agree():
    img = (_rand_rgb(24, 20, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    a = imresize_uint8(img, 0.5)
    b = imresize_uint8(torch.from_numpy(img).permute(2, 0, 1).contiguous(), 0.5)
    assert a.dtype == np.uint8 and a.shape == (12, 10, 3)
    assert np.array_equal(a, b.permute(1, 2, 0).numpy())
    assert imresize_uint8(img[:, :, 0], 0.5).shape == (12, 10)


@needs_data
@pytest.mark.parametrize("dataset,scales", [("Set5", (2, 3, 4)), ("Set14", (2, 3, 4))])
def test_imresize_reproduces_benchmark_lr(dataset, scales):
    """LR = MATLAB imresize(HR cropped to a multiple of s, 1/s, 'bicubic') on uint8: within +-1 grey level."""
    root = DATA / "benchmarks" / dataset
    report = []
    for s in scales:
        for hr_path in sorted((root / "HR").glob("*.png")):
            hr = _u8(hr_path)
            lr = _u8(root / "LR_bicubic" / f"X{s}" / f"{hr_path.stem}x{s}.png")
            levels = torch.from_numpy(hr.astype(np.int32))
            ours = matlab_lr(levels.movedim(-1, 0), s).movedim(0, -1) if hr.ndim == 3 else matlab_lr(levels, s)
            ours = ours.numpy()
            assert ours.shape == lr.shape
            diff = np.abs(ours.astype(int) - lr.astype(int))
            report.append(f"x{s} {hr_path.stem}: max {diff.max()}, differing {np.mean(diff > 0):.4%}")
            assert diff.max() <= 1, report[-1]
            assert np.mean(diff > 0) < 0.01, report[-1]
    print("\n".join(report))


# ----------------------------------------------------------------------------- image io


def test_roundtrip_8bit_rgb_unicode_path(tmp_path):
    x = _rand_rgb(17, 23)
    p = tmp_path / "bild ü 画像.png"
    write_image(p, x)
    img = read_image(p)
    assert img.bit_depth == 8 and not img.gray and img.alpha is None
    assert img.rgb.shape == (1, 3, 17, 23) and img.rgb.dtype == torch.float32
    assert torch.equal(img.rgb, x)
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temp files left


def test_rgb_channel_order(tmp_path):
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR
    p = tmp_path / "red.png"
    cv2.imencode(".png", bgr)[1].tofile(str(p))
    rgb = read_image(p).rgb
    assert torch.allclose(rgb[0, :, 0, 0], torch.tensor([200 / 255, 0, 0]))


def test_16bit_gray_and_alpha_roundtrip(tmp_path):
    levels = torch.arange(0, 65536, 257 * 3, dtype=torch.float32)[:80].reshape(1, 1, 8, 10) / 65535
    rgb16 = levels.repeat(1, 3, 1, 1)
    write_image(tmp_path / "g16.png", rgb16, bit_depth=16, gray=True)
    raw = _u8(tmp_path / "g16.png")
    assert raw.dtype == np.uint16 and raw.ndim == 2
    img = read_image(tmp_path / "g16.png")
    assert img.bit_depth == 16 and img.gray and torch.equal(img.rgb, rgb16)

    x = _rand_rgb(6, 5, 2)
    alpha = torch.linspace(0, 1, 30).reshape(1, 1, 6, 5)
    write_image(tmp_path / "a16.png", x, alpha, bit_depth=16)
    img = read_image(tmp_path / "a16.png")
    assert img.bit_depth == 16 and img.alpha is not None
    assert torch.allclose(img.rgb, x, atol=1e-6)
    assert torch.allclose(img.alpha, (alpha * 65535).round() / 65535, atol=1e-7)

    write_image(tmp_path / "a8.jpg", x, alpha, bit_depth=16)  # jpeg: 8-bit, no alpha
    img = read_image(tmp_path / "a8.jpg")
    assert img.bit_depth == 8 and img.alpha is None


def _jpeg_with_orientation(arr: np.ndarray, orientation: int, big_endian: bool) -> bytes:
    data = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    end = ">" if big_endian else "<"
    tiff = (b"MM" if big_endian else b"II") + struct.pack(end + "HI", 42, 8)
    tiff += struct.pack(end + "H", 1) + struct.pack(end + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack(end + "I", 0)
    app1 = b"Exif\x00\x00" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    return data[:2] + segment + data[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    arr = np.kron(rng.integers(0, 256, (3, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 24x40 blocks
    p = tmp_path / "o.jpg"
    p.write_bytes(_jpeg_with_orientation(arr, orientation, big_endian=orientation % 2 == 0))
    expected = cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR)  # applies EXIF itself
    ours = tensor_to_uint8(read_image(p).rgb)[..., ::-1]
    assert ours.shape == expected.shape
    assert np.array_equal(ours, expected)
    if orientation >= 5:
        assert ours.shape[:2] == (40, 24)


def test_png_exif_orientation_and_jpeg_trailer(tmp_path):
    arr = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    png = cv2.imencode(".png", arr)[1].tobytes()
    tiff = b"II" + struct.pack("<HIH", 42, 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + b"\0" * 4
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    (tmp_path / "r.png").write_bytes(png[:33] + chunk + png[33:])  # after the 8-byte signature + IHDR
    ours = tensor_to_uint8(read_image(tmp_path / "r.png").rgb)[..., ::-1]
    assert np.array_equal(ours, np.rot90(arr, -1))  # orientation 6 = rotate 90 degrees clockwise
    jpg = cv2.imencode(".jpg", arr)[1].tobytes()
    (tmp_path / "t.jpg").write_bytes(jpg + b"vendor trailer" * 200)  # data after EOI is fine
    assert read_image(tmp_path / "t.jpg").rgb.shape == (1, 3, 6, 4)


def test_read_errors(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(tmp_path / "text.png")
    x = _rand_rgb(40, 40)
    for ext in (".png", ".jpg"):
        write_image(tmp_path / f"ok{ext}", x)
        data = (tmp_path / f"ok{ext}").read_bytes()
        (tmp_path / f"cut{ext}").write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(ImageError, match="truncated") as err:
            read_image(tmp_path / f"cut{ext}")
        assert str(tmp_path / f"cut{ext}") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImageError, match="megapixels"):
        read_image(tmp_path / "ok.png", max_pixels=1000)
    # header claims 60000x60000: refused from the header alone, before any decoding
    ihdr = struct.pack(">I4sII", 13, b"IHDR", 60000, 60000) + b"\x08\x02\x00\x00\x00"
    bomb = b"\x89PNG\r\n\x1a\n" + ihdr + b"\0" * 64
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(ImageError, match="3600.0 megapixels"):
        read_image(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)


def test_write_errors_leave_nothing_behind(tmp_path):
    x = _rand_rgb(8, 8)
    with pytest.raises(ImageError, match="cannot write"):
        write_image(tmp_path / "no" / "such" / "dir.png", x)
    (tmp_path / "adir.png").mkdir()
    with pytest.raises(ImageError, match="cannot write"):
        write_image(tmp_path / "adir.png", x)
    with pytest.raises(ImageError, match="extension"):
        write_image(tmp_path / "x.xyz", x)
    with pytest.raises(ImageError, match="shape"):
        write_image(tmp_path / "x.png", torch.zeros(2, 3, 4, 4))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adir.png"]


def test_write_replaces_existing_file(tmp_path):
    p = tmp_path / "a.png"
    write_image(p, torch.zeros(1, 3, 4, 4))
    write_image(p, torch.ones(1, 3, 5, 5))
    assert read_image(p).rgb.shape[-1] == 5 and len(list(tmp_path.iterdir())) == 1


def test_tensor_to_uint8_is_basicsr_tensor2img():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.7]).reshape(1, 1, 1, 7).repeat(1, 3, 1, 1)
    out = tensor_to_uint8(x)
    assert out.shape == (1, 7, 3) and out.dtype == np.uint8
    # numpy/torch round half to even on float32 x*255: 0.5 -> 0, 1.5 -> 2, 127.5 -> 128
    assert out[0, :, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]


# ----------------------------------------------------------------------------- datasets


def test_shared_data_dir_env_then_user_data_dir_never_the_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSR_DATA", str(tmp_path / "d"))
    assert shared_data_dir() == tmp_path / "d" and data_root_default() == tmp_path / "d" / "benchmarks"
    monkeypatch.delenv("QUANTSR_DATA")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    (tmp_path / "shared" / "data").mkdir(parents=True)  # the old cwd-relative guess must not be used
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert shared_data_dir() is None  # the per-user folder does not exist yet
    (tmp_path / "xdg" / "quantsr").mkdir(parents=True)
    assert shared_data_dir() == tmp_path / "xdg" / "quantsr"
    monkeypatch.chdir(tmp_path)
    assert shared_data_dir() == tmp_path / "xdg" / "quantsr"


def test_default_dataset_root_finds_edsr_benchmark_tar_layout(tmp_path, monkeypatch):
    _make_dataset(tmp_path / "benchmark" / "Urban100")  # benchmark.tar extracts to benchmark/<Name>
    monkeypatch.setenv("QUANTSR_DATA", str(tmp_path))
    assert resolve_dataset("urban100") == (tmp_path / "benchmark" / "Urban100").resolve()
    monkeypatch.setenv("QUANTSR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="data check"):
        resolve_dataset("Set5")


def _make_dataset(root: Path, names=("a", "b"), size=(24, 20), scale=4, lr=True, tmpl="{}x{s}") -> Path:
    (root / "HR").mkdir(parents=True)
    for i, n in enumerate(names):
        hr = _rand_rgb(size[0] + i, size[1] + 2 * i, i)
        write_image(root / "HR" / f"{n}.png", hr)
        if lr:
            (root / "LR_bicubic" / f"X{scale}").mkdir(parents=True, exist_ok=True)
            levels = matlab_lr(torch.from_numpy(tensor_to_uint8(hr).astype(np.int32)).movedim(-1, 0), scale)
            write_image(root / "LR_bicubic" / f"X{scale}" / (tmpl.format(n, s=scale) + ".png"), levels[None] / 255)
    return root


def test_resolve_dataset(tmp_path, monkeypatch):
    _make_dataset(tmp_path / "benchmarks" / "Set5")
    _make_dataset(tmp_path / "benchmarks" / "BSD100")
    assert resolve_dataset("set5", tmp_path / "benchmarks") == (tmp_path / "benchmarks" / "Set5").resolve()
    assert resolve_dataset("SET5", tmp_path) == (tmp_path / "benchmarks" / "Set5").resolve()  # data dir works too
    assert resolve_dataset("B100", tmp_path / "benchmarks").name == "BSD100"
    assert resolve_dataset(str(tmp_path / "benchmarks" / "Set5")).name == "Set5"
    monkeypatch.setenv("QUANTSR_DATA", str(tmp_path))
    assert resolve_dataset("Set5").name == "Set5"
    with pytest.raises(DatasetError, match="Urban100.*not found"):
        resolve_dataset("Urban100")
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset(str(tmp_path / "nope" / "Set5"))


def test_benchmark_pairs_and_manga_naming(tmp_path):
    root = _make_dataset(tmp_path / "Manga109", tmpl="{}_LRBI_x{s}")
    ds = BenchmarkDataset(root, 4)
    items = list(ds)
    assert [n for n, _, _ in items] == ["a", "b"]
    for _, lr, hr in items:
        assert lr.shape[:2] == (1, 3) and hr.shape[-2:] == (lr.shape[-2] * 4, lr.shape[-1] * 4)


def test_benchmark_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        BenchmarkDataset(tmp_path / "missing", 4)
    root = _make_dataset(tmp_path / "count")
    (root / "LR_bicubic" / "X4" / "bx4.png").unlink()
    with pytest.raises(DatasetError, match="count mismatch: 2 HR vs 1 LR"):
        BenchmarkDataset(root, 4)
    root = _make_dataset(tmp_path / "names")
    (root / "LR_bicubic" / "X4" / "bx4.png").rename(root / "LR_bicubic" / "X4" / "zx4.png")
    with pytest.raises(DatasetError, match="b.png"):
        BenchmarkDataset(root, 4)
    root = _make_dataset(tmp_path / "size")
    write_image(root / "LR_bicubic" / "X4" / "ax4.png", torch.zeros(1, 3, 3, 3))
    with pytest.raises(DatasetError, match="not floor") as err:
        BenchmarkDataset(root, 4)
    assert "ax4.png" in str(err.value)
    root = _make_dataset(tmp_path / "bad")
    (root / "HR" / "b.png").write_bytes(b"garbage")
    ds = BenchmarkDataset(root, 4, cache=tmp_path / "cache")
    ds[0]
    with pytest.raises(DatasetError, match="unreadable image") as err:
        ds[1]
    assert "b.png" in str(err.value)


@needs_data
def test_benchmark_set14_gray_bridge():
    ds = BenchmarkDataset(resolve_dataset("set14", DATA / "benchmarks"), 4)
    assert len(ds) == 14 and not ds.generated
    i = ds.names.index("bridge")
    _, lr, hr = ds[i]
    assert lr.shape == (1, 3, 128, 128) and hr.shape == (1, 3, 512, 512)
    assert torch.equal(lr[:, 0], lr[:, 1]) and torch.equal(hr[:, 0], hr[:, 2])


@needs_data
def test_generated_lr_equals_shipped_lr_and_is_cached(tmp_path):
    src = DATA / "benchmarks" / "Set5"
    shutil.copytree(src / "HR", tmp_path / "Set5" / "HR")
    ds = BenchmarkDataset(tmp_path / "Set5", 4, cache=tmp_path / "cache")
    assert ds.generated
    shipped = BenchmarkDataset(src, 4)
    for (n1, lr1, hr1), (n2, lr2, hr2) in zip(ds, shipped):
        assert n1 == n2 and torch.equal(lr1, lr2) and torch.equal(hr1, hr2)
    cached = sorted(p.name for p in ds.lr_dir.iterdir())
    assert cached == [f"{n}x4.png" for n in ds.names]
    stamp = ds.lr_files[0].stat().st_mtime_ns
    BenchmarkDataset(tmp_path / "Set5", 4, cache=tmp_path / "cache")[0]
    assert ds.lr_files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not (tmp_path / "Set5" / "LR_bicubic").exists()  # dataset folder untouched


def _train_folder(root: Path) -> Path:
    root.mkdir()
    write_image(root / "big1.png", _rand_rgb(70, 90, 1))
    write_image(root / "big2.png", _rand_rgb(65, 64, 2))
    write_image(root / "small.png", _rand_rgb(40, 50, 3))
    return root


def test_train_dataset_determinism_and_shapes(tmp_path):
    folder = _train_folder(tmp_path / "train")
    ds = TrainDataset([folder], scale=4, patch_size=64, seed=7)
    assert len(ds) == 2 and [p.name for p in ds.skipped] == ["small.png"]
    lr, hr = ds.sample_batch(3, 5)
    assert lr.shape == (5, 3, 16, 16) and hr.shape == (5, 3, 64, 64) and lr.dtype == torch.float32
    assert 0 <= float(hr.min()) and float(hr.max()) <= 1
    again = TrainDataset([folder], scale=4, patch_size=64, seed=7).sample_batch(3, 5)
    assert torch.equal(again[0], lr) and torch.equal(again[1], hr)
    other = ds.sample_batch(4, 5)
    assert not torch.equal(other[1], hr)
    assert not torch.equal(TrainDataset([folder], 4, 64, seed=8).sample_batch(3, 5)[1], hr)
    a, b = ds[1], ds[1]
    assert torch.equal(a[1], b[1]) and a[0].shape == (3, 16, 16)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][1], a[1])


def test_train_lr_is_matlab_bicubic_of_hr_patch(tmp_path):
    folder = _train_folder(tmp_path / "train")
    ds = TrainDataset([folder], scale=2, patch_size=32, seed=0)
    lr, hr = ds.sample_batch(0, 8)
    ref = imresize(hr.double(), 0.5).float()
    # identical up to uint8 rounding in the interior (the borders see real neighbours, not mirrors)
    assert (lr - ref)[..., 3:-3, 3:-3].abs().max() * 255 <= 1.01


def test_train_dataset_small_images_and_errors(tmp_path):
    folder = _train_folder(tmp_path / "train")
    padded = TrainDataset([folder], scale=4, patch_size=64, small="pad")
    assert len(padded) == 3 and not padded.skipped
    assert padded.sample_batch(0, 4)[1].shape == (4, 3, 64, 64)
    with pytest.raises(DatasetError, match="smaller than patch_size"):
        TrainDataset([folder], scale=4, patch_size=128)
    with pytest.raises(ConfigError, match="multiple of scale"):
        TrainDataset([folder], scale=3, patch_size=64)
    with pytest.raises(DatasetError, match="not found"):
        TrainDataset([tmp_path / "nope"], scale=4, patch_size=64)
    (folder / "broken.png").write_bytes(b"xx")
    with pytest.raises(DatasetError, match="broken.png"):
        TrainDataset([folder], scale=4, patch_size=64)


@needs_data
def test_train_dataset_t91_small_images():
    ds = TrainDataset([DATA / "train" / "T91"], scale=4, patch_size=192, seed=0)
    assert len(ds.skipped) == 51 and len(ds) == 40  # feasibility.md: 51 of 91 are smaller than 192
    lr, hr = ds.sample_batch(0, 2)
    assert lr.shape == (2, 3, 48, 48) and hr.shape == (2, 3, 192, 192)

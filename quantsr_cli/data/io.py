"""Image reading and writing on OpenCV, robust to the files users actually have.

- Unicode paths: bytes are read with ``np.fromfile`` and decoded with ``cv2.imdecode``; writes go
  through ``cv2.imencode`` + ``ndarray.tofile`` (``cv2.imread``/``imwrite`` fail on non-ASCII paths
  on Windows).
- EXIF orientation: ``cv2.IMREAD_UNCHANGED`` (needed for alpha and 16-bit) ignores EXIF, so the
  Orientation tag (0x0112) is parsed here from JPEG ``APP1`` segments, PNG ``eXIf`` chunks and WebP
  ``EXIF`` chunks and applied with numpy flips/transposes (same result as ``cv2.IMREAD_COLOR``).
- Size limit: width and height are read from the header before decoding, for every format OpenCV
  reads (:mod:`.imagesize`), and checked against ``max_pixels`` (default :data:`MAX_PIXELS`) -- and so is
  the output a model will make of it (pixels x scale²) -- so a decompression bomb is refused without
  allocating it. A file whose size cannot be read from its header is never decoded.
- Decoder chatter: what libpng/libtiff print on stderr while decoding a corrupt file is captured and,
  when decoding fails, becomes part of the one error line.
- Truncation: a JPEG without its end-of-image marker or a PNG without ``IEND`` is refused (libjpeg
  otherwise returns a half-grey image with only a warning).
- 8/16-bit samples, grayscale and alpha are kept and reported in :class:`Image`.

Every failure raises :class:`quantsr_cli.errors.ImageError` with the path and a one-line reason.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from quantsr_cli.data.headers import apply_orientation, exif_orientation, header_size, truncated
from quantsr_cli.errors import ImageError
from quantsr_cli.fileio import atomic_write, remove_stale_temp_files

__all__ = [
    "MAX_PIXELS", "IMAGE_EXTENSIONS", "Image", "read_image", "write_image", "tensor_to_uint8", "header_size",
    "list_images", "remove_stale_temp_files", "image_array", "write_array", "check_pixels", "image_size",
]

MAX_PIXELS = 100_000_000
"""Largest image (width x height, 100 megapixels) :func:`read_image` accepts unless told otherwise."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File extensions treated as images (lower case) when listing folders."""

_NO_ALPHA_FORMATS = (".jpg", ".jpeg", ".bmp")
"""Formats whose files have no alpha channel (an input's alpha is dropped there, with a warning)."""
_SIXTEEN_BIT_FORMATS = (".png", ".tif", ".tiff")


@dataclass
class Image:
    """A decoded image.

    Attributes:
        rgb: float32 ``(1, 3, H, W)`` in ``[0, 1]``, RGB (grayscale sources are replicated to 3 channels).
        alpha: float32 ``(1, 1, H, W)`` in ``[0, 1]``, or None when the file has no alpha channel.
        bit_depth: bits per sample of the file, 8 or 16.
        gray: True when the source had a single colour channel (gray or gray + alpha).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    bit_depth: int
    gray: bool

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return int(self.rgb.shape[-2]), int(self.rgb.shape[-1])


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (extensions in :data:`IMAGE_EXTENSIONS`), sorted by name."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- reading

def image_error_reason(exc: ImageError) -> str:
    """The message of an :class:`ImageError` without its ``"<path>: "`` prefix."""
    text = str(exc)
    prefix = f"{exc.path}: " if exc.path else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text



def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS, scale: int = 1) -> Image:
    """Read an image file into an :class:`Image`.

    Args:
        path: file path (any Unicode).
        max_pixels: refuse images with more than this many pixels (width x height), or whose output at
            ``scale`` would have more; None = no limit. Checked from the header, before decoding.
        scale: the upscaling factor the image is read for (1 = the image itself).

    Returns:
        The decoded image, EXIF orientation applied, RGB in ``[0, 1]``.

    Raises:
        ImageError: missing, empty, truncated, not an image, unsupported sample type or too large.
    """
    path = Path(path)
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError("no such file", path) from None
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path) from None
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})", path) from None
    if raw.size == 0:
        raise ImageError("empty file (0 bytes)", path)
    data = raw.tobytes()
    _quiet_opencv()
    dims = header_size(data)
    if dims is None:  # never hand OpenCV a file whose size we do not know
        raise ImageError("not a readable image (unsupported format or corrupt data)", path)
    check_pixels(dims[0], dims[1], max_pixels, path, scale)
    if truncated(data):
        raise ImageError("truncated image file (end marker missing)", path)
    with _captured_stderr() as chatter:
        try:
            arr = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            arr = None
    if arr is None or arr.size == 0:
        detail = _decoder_message(chatter())
        raise ImageError(f"not a readable image ({detail or 'unsupported format or corrupt data'})", path)
    check_pixels(arr.shape[1], arr.shape[0], max_pixels, path, scale)
    # OpenCV decodes a gray+alpha PNG (colour type 4) as BGRA: remember it was gray
    gray_alpha = data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 25 and data[25] == 4
    return _to_image(apply_orientation(arr, exif_orientation(data)), path, gray_alpha)


def image_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header (first 64 KiB), or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return header_size(fh.read(1 << 16))
    except OSError:
        return None


@contextmanager
def _captured_stderr():
    """Redirect file descriptor 2 (where libpng/libtiff write) to a temporary file; yields a reader."""
    text = {"value": ""}
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        sink = tempfile.TemporaryFile()
    except (OSError, ValueError, AttributeError):
        yield lambda: ""
        return
    try:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: text["value"]
        finally:
            os.dup2(saved, 2)
            sink.seek(0)
            text["value"] = sink.read(8192).decode("utf-8", "replace")
    finally:
        os.close(saved)
        sink.close()


def _decoder_message(chatter: str) -> str:
    """The first line a decoder library wrote (e.g. ``libpng error: IHDR: CRC error``), shortened."""
    for line in chatter.splitlines():
        line = line.strip()
        if line and "━" not in line:
            return line[:160]
    return ""


_OPENCV_QUIET = False


def _quiet_opencv() -> None:
    """Silence OpenCV's own stderr logging (decode failures become one ImageError line instead),
    unless the user set ``OPENCV_LOG_LEVEL``."""
    global _OPENCV_QUIET
    if not _OPENCV_QUIET:
        _OPENCV_QUIET = True
        if "OPENCV_LOG_LEVEL" not in os.environ:
            try:
                cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            except AttributeError:  # builds without the logging utilities
                pass


def check_pixels(w: int, h: int, max_pixels: int | None, path: str | Path, scale: int = 1) -> None:
    """ImageError unless ``w x h`` (and its output ``w*scale x h*scale``) is within ``max_pixels``."""
    if w <= 0 or h <= 0:
        raise ImageError(f"invalid image size {w}x{h}", path)
    if max_pixels is None:
        return
    limit = f"above the limit of {max_pixels / 1e6:.1f} (raise it with --max-pixels)"
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, {limit}", path)
    if w * h * scale * scale > max_pixels:
        ow, oh = w * scale, h * scale
        raise ImageError(f"output would be {ow}x{oh} = {ow * oh / 1e6:.1f} megapixels at x{scale}, {limit}", path)


def _to_image(arr: np.ndarray, path: Path, gray_alpha: bool = False) -> Image:
    if arr.dtype == np.uint8:
        depth, peak = 8, 255.0
    elif arr.dtype == np.uint16:
        depth, peak = 16, 65535.0
    else:
        raise ImageError(f"unsupported sample type {arr.dtype} (only 8- and 16-bit images)", path)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    alpha = None
    if channels == 1:
        color, gray = np.repeat(arr, 3, axis=2), True
    elif channels == 2:
        color, alpha, gray = np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1], True
    elif channels == 3:
        color, gray = arr[:, :, ::-1], False
    elif channels == 4:
        color, alpha, gray = arr[:, :, 2::-1], arr[:, :, 3], gray_alpha
    else:
        raise ImageError(f"unsupported channel count {channels}", path)
    planes = color.transpose(2, 0, 1).astype(np.float32, order="C")
    planes /= peak  # in place: no second float copy of a large image
    rgb = torch.from_numpy(planes)
    a = None
    if alpha is not None:
        a = torch.from_numpy(np.ascontiguousarray(alpha).astype(np.float32) / peak)[None, None]
    return Image(rgb=rgb[None], alpha=a, bit_depth=depth, gray=gray)


# --------------------------------------------------------------------------- writing

def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """BasicSR ``tensor2img`` (RGB kept): clamp to ``[0, 1]``, x255 in float32, round half to even.

    Args:
        x: float tensor ``(1, C, H, W)`` or ``(C, H, W)``, or ``(N, C, H, W)``, values nominally in ``[0, 1]``.

    Returns:
        uint8 numpy ``(H, W, C)`` (``(N, H, W, C)`` when ``N > 1``), same channel order as ``x``.
    """
    t = x.detach().to("cpu", torch.float32)
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
    t = (t.clamp(0, 1) * 255.0).round()
    arr = t.numpy().astype(np.uint8)
    return arr.transpose(1, 2, 0) if arr.ndim == 3 else arr.transpose(0, 2, 3, 1)


def _quantize(x: torch.Tensor, peak: int, dtype: type) -> np.ndarray:
    t = x.detach().to("cpu", torch.float32).clamp(0, 1)  # a new tensor: the in-place ops below are ours
    return t.mul_(float(peak)).round_().numpy().astype(dtype)


def write_image(
    path: str | Path,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    bit_depth: int = 8,
    gray: bool = False,
    jpeg_quality: int = 95,
) -> Path:
    """Write an image atomically (temp file in the same folder, then ``os.replace``).

    The format follows the final name's extension. 16-bit is kept for PNG/TIFF and reduced to 8-bit
    for other formats; ``alpha`` is dropped for formats without alpha (JPEG, BMP); ``gray`` writes one
    channel of BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (exactly the gray value when R = G = B).
    Same as :func:`write_array` of :func:`image_array` (callers holding a large ``rgb`` can free it
    between the two).

    Args:
        path: destination file; its folder must exist.
        rgb: float ``(1, 3, H, W)`` or ``(3, H, W)`` in ``[0, 1]`` (clamped), RGB.
        alpha: float ``(1, 1, H, W)`` / ``(1, H, W)`` / ``(H, W)`` in ``[0, 1]``, or None.
        bit_depth: 8 or 16 bits per sample.
        gray: write a single-channel (gray) image.
        jpeg_quality: JPEG quality 0..100 (JPEG only).

    Returns:
        The written path.

    Raises:
        ImageError: unknown extension, bad tensor shape, encoder failure or unwritable destination.
    """
    return write_array(path, image_array(path, rgb, alpha, bit_depth, gray), jpeg_quality)


def image_array(
    path: str | Path,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    bit_depth: int = 8,
    gray: bool = False,
) -> np.ndarray:
    """The integer OpenCV array (``(H, W)`` or ``(H, W, C)`` BGR[A], uint8/uint16) :func:`write_image`
    encodes for ``path``'s format; arguments as there."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ImageError(f"unknown image extension {ext or '(none)'!r}; use one of {', '.join(IMAGE_EXTENSIONS)}", path)
    if bit_depth not in (8, 16):
        raise ImageError(f"bit_depth must be 8 or 16, got {bit_depth}", path)
    if ext not in _SIXTEEN_BIT_FORMATS:
        bit_depth = 8
    peak, dtype = (65535, np.uint16) if bit_depth == 16 else (255, np.uint8)
    t = rgb.detach()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ImageError(f"expected an RGB tensor (1, 3, H, W), got shape {tuple(rgb.shape)}", path)
    t = t.to("cpu", torch.float32)
    if gray and t.shape[0] == 3:
        t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2])[None]
    # One plane at a time into one (H, W, C) array: peak memory stays near the uint8/uint16 image size
    # plus one float plane, whatever the image size (no float copy of the whole image).
    sources = [t[2], t[1], t[0]] if t.shape[0] == 3 else [t[0]]  # OpenCV order: BGR
    if alpha is not None and ext not in _NO_ALPHA_FORMATS:
        a = alpha.detach().reshape(alpha.shape[-2], alpha.shape[-1])
        if tuple(a.shape) != tuple(t.shape[-2:]):
            raise ImageError(f"alpha size {tuple(a.shape)} differs from image size {tuple(t.shape[-2:])}", path)
        if len(sources) == 1:
            sources = sources * 3  # OpenCV encoders have no gray+alpha layout
        sources.append(a)
    h, w = int(t.shape[-2]), int(t.shape[-1])
    arr = np.empty((h, w, len(sources)), dtype=dtype)
    rows = max(1, (1 << 22) // max(w, 1))  # ~16 MB of float32 temporaries at a time
    done: dict[int, int] = {}
    for k, src in enumerate(sources):
        if id(src) in done:
            arr[:, :, k] = arr[:, :, done[id(src)]]
            continue
        done[id(src)] = k
        for top in range(0, h, rows):
            arr[top : top + rows, :, k] = _quantize(src[top : top + rows], peak, dtype)
    return arr[:, :, 0] if len(sources) == 1 else arr


def write_array(path: str | Path, arr: np.ndarray, jpeg_quality: int = 95) -> Path:
    """Encode an :func:`image_array` result in ``path``'s format and write it atomically
    (``jpeg_quality``: 0..100 for JPEG, 1..100 for WebP, where 100 is lossless; ignored otherwise)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ImageError(f"unknown image extension {ext or '(none)'!r}; use one of {', '.join(IMAGE_EXTENSIONS)}", path)
    params = ([cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if ext in (".jpg", ".jpeg")
              else [cv2.IMWRITE_WEBP_QUALITY, int(jpeg_quality)] if ext == ".webp" else [])
    try:
        ok, buf = cv2.imencode(ext, arr, params)
    except cv2.error as exc:
        raise ImageError(f"cannot encode as {ext}: {str(exc).strip().splitlines()[-1]}", path) from None
    if not ok:
        raise ImageError(f"cannot encode as {ext}", path)
    _atomic_write(path, buf)
    return path


def _atomic_write(path: Path, buf: np.ndarray) -> None:
    try:
        atomic_write(path, lambda fh: buf.tofile(fh))
    except OSError as exc:
        raise ImageError(f"cannot write file ({exc.strerror or exc})", path) from None

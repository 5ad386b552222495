"""Cheap parsing of encoded image headers: size before decoding, EXIF orientation, truncation.

Pure-Python readers of the few header fields :mod:`quantsr_cli.data.io` needs, so that a huge image
is refused before OpenCV allocates it and EXIF orientation can be applied to ``IMREAD_UNCHANGED``
decodes (which ignore it). Malformed headers never raise: the functions return None / 1 / False.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["header_size", "exif_orientation", "apply_orientation", "truncated"]


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG, JPEG, BMP, GIF or WebP header without decoding, else None."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM" and len(data) >= 26:
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
    except struct.error:
        return None
    return None


def _jpeg_segments(data: bytes):
    """Yield ``(marker, payload)`` of JPEG segments up to start-of-scan."""
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        yield marker, data[i + 4 : i + 2 + length]
        if marker == 0xDA:
            return
        i += 2 + length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, payload in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(payload) >= 5:
            h, w = struct.unpack(">HH", payload[1:5])
            return w, h
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _tiff_orientation(tiff: bytes) -> int:
    """Orientation tag (1..8) from a TIFF-structured EXIF block, 1 when absent or malformed."""
    if tiff[:2] == b"II":
        end = "<"
    elif tiff[:2] == b"MM":
        end = ">"
    else:
        return 1
    (ifd,) = struct.unpack(end + "I", tiff[4:8])
    (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        tag, typ = struct.unpack(end + "HH", entry[:4])
        if tag == 0x0112 and typ == 3:
            (value,) = struct.unpack(end + "H", entry[8:10])
            return value if 1 <= value <= 8 else 1
    return 1


def exif_orientation(data: bytes) -> int:
    """EXIF Orientation (1..8) of an encoded JPEG, PNG or WebP file; 1 when absent or unreadable."""
    try:
        if data[:2] == b"\xff\xd8":
            for marker, payload in _jpeg_segments(data):
                if marker == 0xE1 and payload[:6] == b"Exif\x00\x00":
                    return _tiff_orientation(payload[6:])
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            i = 8
            while i + 8 <= len(data):
                length, ctype = struct.unpack(">I4s", data[i : i + 8])
                if ctype == b"eXIf":
                    return _tiff_orientation(data[i + 8 : i + 8 + length])
                if ctype == b"IEND":
                    break
                i += 12 + length
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            i = 12
            while i + 8 <= len(data):
                ctype, length = struct.unpack("<4sI", data[i : i + 8])
                if ctype == b"EXIF":
                    block = data[i + 8 : i + 8 + length]
                    return _tiff_orientation(block[6:] if block[:6] == b"Exif\x00\x00" else block)
                i += 8 + length + (length & 1)
    except (struct.error, IndexError):
        return 1
    return 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded ``(H, W[, C])`` array upright according to the EXIF Orientation value."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: a.swapaxes(0, 1)[:, ::-1],
        7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
        8: lambda a: a.swapaxes(0, 1)[::-1],
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(arr))


def truncated(data: bytes) -> bool:
    """True for a JPEG with no end-of-image marker after its first scan, or a PNG without ``IEND``.

    Entropy-coded JPEG data byte-stuffs 0xFF, so ``FF D9`` after start-of-scan is the real EOI
    (an EXIF thumbnail's EOI comes before it); trailing vendor data after EOI is accepted.
    """
    if data[:2] == b"\xff\xd8":
        sos = data.find(b"\xff\xda", 2)
        return sos < 0 or data.find(b"\xff\xd9", sos) < 0
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") < 0
    return False

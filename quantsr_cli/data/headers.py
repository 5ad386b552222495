"""Cheap parsing of encoded image headers: EXIF orientation and truncation (sizes: :mod:`.imagesize`).

Pure-Python readers of the few header fields :mod:`quantsr_cli.data.io` needs, so that EXIF orientation
can be applied to ``IMREAD_UNCHANGED`` decodes (which ignore it) and truncated files are refused.
Malformed headers never raise: the functions return 1 / False.
"""

from __future__ import annotations

import struct

import numpy as np

from quantsr_cli.data.imagesize import header_size, jpeg_segments

__all__ = ["header_size", "exif_orientation", "apply_orientation", "truncated"]


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
            for marker, payload in jpeg_segments(data):
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

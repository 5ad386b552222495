"""Image size from the file header, for every format OpenCV's ``imdecode`` reads, without decoding.

:func:`header_size` knows PNG, JPEG, WebP, TIFF and BigTIFF, BMP/DIB (Windows and OS/2 headers), GIF,
PBM/PGM/PPM, PAM, PFM, Sun raster, Radiance HDR, JPEG 2000 (JP2 boxes and raw codestreams) and AVIF.
:mod:`quantsr_cli.data.io` refuses a file whose size it cannot read this way, so no image is ever
decoded before its pixel count (and its output's) is known. Malformed headers never raise here: the
function returns None.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

__all__ = ["header_size", "jpeg_segments"]

_PNG = b"\x89PNG\r\n\x1a\n"
_JP2 = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` declared by an encoded image's header, or None (unknown format or malformed)."""
    try:
        for test, reader in _READERS:
            if test(data):
                return reader(data)
    except (struct.error, ValueError, IndexError, OverflowError):
        return None
    return None


def jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield ``(marker, payload)`` of JPEG segments up to start-of-scan."""
    i, n = 2, len(data)
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


def _png(data: bytes) -> tuple[int, int] | None:
    return struct.unpack(">II", data[16:24]) if data[12:16] == b"IHDR" else None


def _jpeg(data: bytes) -> tuple[int, int] | None:
    for marker, payload in jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(payload) >= 5:
            h, w = struct.unpack(">HH", payload[1:5])
            return w, h
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _bmp(data: bytes) -> tuple[int, int] | None:
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)


def _gif(data: bytes) -> tuple[int, int] | None:
    return struct.unpack("<HH", data[6:10])


def _tiff(data: bytes) -> tuple[int, int] | None:
    """First IFD's ImageWidth (256) and ImageLength (257); classic TIFF and BigTIFF, either byte order."""
    e = "<" if data[:2] == b"II" else ">"
    (version,) = struct.unpack(e + "H", data[2:4])
    if version == 42:
        (ifd,) = struct.unpack(e + "I", data[4:8])
        (count,) = struct.unpack(e + "H", data[ifd : ifd + 2])
        entry_size, first, value_at = 12, ifd + 2, 8
    elif version == 43:
        (ifd,) = struct.unpack(e + "Q", data[8:16])
        (count,) = struct.unpack(e + "Q", data[ifd : ifd + 8])
        entry_size, first, value_at = 20, ifd + 8, 12
    else:
        return None
    found: dict[int, int] = {}
    for k in range(min(count, 4096)):
        entry = data[first + entry_size * k : first + entry_size * (k + 1)]
        tag, typ = struct.unpack(e + "HH", entry[:4])
        if tag not in (256, 257):
            continue
        fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
        if fmt is None:
            return None
        (found[tag],) = struct.unpack_from(e + fmt, entry, value_at)
    return (found[256], found[257]) if len(found) == 2 else None


_TOKEN = re.compile(rb"\s*(?:#[^\n]*\n\s*)*(\S+)")


def _pnm(data: bytes) -> tuple[int, int] | None:
    """P1-P6 (PBM/PGM/PPM) and PF/Pf (PFM): magic, width, height as whitespace-separated tokens."""
    pos, values = 2, []
    for _ in range(2):
        m = _TOKEN.match(data, pos)
        if m is None:
            return None
        values.append(int(m.group(1)))
        pos = m.end()
    return values[0], values[1]


def _pam(data: bytes) -> tuple[int, int] | None:
    head = data[: data.find(b"ENDHDR")] if b"ENDHDR" in data[:4096] else data[:4096]
    fields = dict(re.findall(rb"(?m)^\s*(WIDTH|HEIGHT)\s+(\d+)", head))
    return (int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])) if len(fields) == 2 else None


def _sun(data: bytes) -> tuple[int, int] | None:
    return struct.unpack(">II", data[4:12])


def _hdr(data: bytes) -> tuple[int, int] | None:
    m = re.search(rb"\n\n([-+])([XY]) (\d+) ([-+])([XY]) (\d+)", data[:65536])
    if m is None or m.group(2) == m.group(5):
        return None
    sizes = {m.group(2): int(m.group(3)), m.group(5): int(m.group(6))}
    return sizes[b"X"], sizes[b"Y"]


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """ISO base media / JP2 boxes in ``data[start:end]``: ``(type, payload start, payload end)``."""
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        head = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[i + 8 : i + 16])
            head = 16
        elif size == 0:
            size = end - i
        if size < head:
            return
        yield kind, i + head, min(i + size, end)
        i += size


def _j2k_siz(data: bytes, at: int) -> tuple[int, int] | None:
    """Image size from a JPEG 2000 codestream's SIZ marker segment starting at ``at`` (``FF4F FF51``)."""
    if data[at : at + 4] != b"\xff\x4f\xff\x51":
        return None
    x, y, x0, y0 = struct.unpack(">IIII", data[at + 8 : at + 24])
    return max(x - x0, 0), max(y - y0, 0)


def _jp2(data: bytes) -> tuple[int, int] | None:
    if data[:4] == b"\xff\x4f\xff\x51":
        return _j2k_siz(data, 0)
    sizes = []
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"jp2h":
            for sub, s, _ in _boxes(data, start, end):
                if sub == b"ihdr":
                    h, w = struct.unpack(">II", data[s : s + 8])
                    sizes.append((w, h))
        elif kind == b"jp2c":
            siz = _j2k_siz(data, start)
            if siz is not None:
                sizes.append(siz)
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None  # the larger claim is what may be allocated


def _avif(data: bytes) -> tuple[int, int] | None:
    """The largest ``ispe`` (image spatial extents) property of the ``meta`` box."""
    sizes = []

    def walk(start: int, end: int, depth: int) -> None:
        for kind, s, e in _boxes(data, start, end):
            if kind == b"meta" and depth == 0:
                walk(s + 4, e, 1)  # a full box: version and flags first
            elif kind in (b"iprp", b"ipco") and depth in (1, 2):
                walk(s, e, depth + 1)
            elif kind == b"ispe":
                sizes.append(struct.unpack(">II", data[s + 4 : s + 12]))

    walk(0, len(data), 0)
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


_READERS = (
    (lambda d: d[:8] == _PNG, _png),
    (lambda d: d[:2] == b"\xff\xd8", _jpeg),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), _tiff),
    (lambda d: d[:2] == b"BM" and len(d) >= 26, _bmp),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    (lambda d: d[:1] == b"P" and d[1:2] in b"123456" and d[2:3].isspace(), _pnm),
    (lambda d: d[:2] in (b"PF", b"Pf") and d[2:3].isspace(), _pnm),
    (lambda d: d[:3] == b"P7\n", _pam),
    (lambda d: d[:4] == b"\x59\xa6\x6a\x95", _sun),
    (lambda d: d[:10] == b"#?RADIANCE" or d[:6] == b"#?RGBE", _hdr),
    (lambda d: d[:12] == _JP2 or d[:4] == b"\xff\x4f\xff\x51", _jp2),
    (lambda d: d[4:8] == b"ftyp", _avif),
)

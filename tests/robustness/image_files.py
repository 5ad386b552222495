"""Hand-made image files for the size-limit tests: headers of every format OpenCV decodes, declaring any size.

Each builder returns the bytes of a file whose header declares ``w x h`` pixels followed by only a few
bytes of data (or, for :func:`tiff_bomb`, a real deflate-compressed image of zeros).
"""

from __future__ import annotations

import struct
import zlib


def _tiff(w: int, h: int, big_endian: bool, compression: int, data: bytes) -> bytes:
    e = ">" if big_endian else "<"
    magic = b"MM\x00\x2a" if big_endian else b"II\x2a\x00"
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, compression), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, h), (279, 4, len(data))]
    ifd_size = 2 + 12 * len(tags) + 4
    offset = 8 + ifd_size
    out = bytearray(magic + struct.pack(e + "I", 8) + struct.pack(e + "H", len(tags)))
    for tag, typ, value in tags:
        value = offset if tag == 273 else value
        packed = struct.pack(e + "H", value) + b"\0\0" if typ == 3 else struct.pack(e + "I", value)
        out += struct.pack(e + "HHI", tag, typ, 1) + packed
    out += struct.pack(e + "I", 0)
    return bytes(out) + data


def tiff_header(w: int, h: int, big_endian: bool = False) -> bytes:
    return _tiff(w, h, big_endian, 1, b"\0" * 64)


def tiff_bomb(w: int, h: int) -> bytes:
    """A real 8-bit gray TIFF of zeros, deflate-compressed: ``w*h`` bytes once decoded, ~1/1000 of it on disk."""
    comp = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    parts, left = [], w * h
    while left:
        n = min(left, len(zeros))
        parts.append(comp.compress(zeros[:n]))
        left -= n
    parts.append(comp.flush())
    return _tiff(w, h, False, 8, b"".join(parts))


def pnm_header(w: int, h: int, kind: str) -> bytes:
    """``P5`` (PGM), ``P6`` (PPM), ``P7`` (PAM) or ``PF`` (PFM) header."""
    if kind == "P7":
        head = f"P7\nWIDTH {w}\nHEIGHT {h}\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
    elif kind == "PF":
        head = f"PF\n{w} {h}\n-1.0\n"
    else:
        head = f"{kind}\n# a comment line\n{w} {h}\n255\n"
    return head.encode() + b"\0" * 64


def sun_raster_header(w: int, h: int) -> bytes:
    return struct.pack(">8I", 0x59A66A95, w, h, 24, w * h * 3, 1, 0, 0) + b"\0" * 64


def hdr_header(w: int, h: int) -> bytes:
    return f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\nEXPOSURE=1.0\n\n-Y {h} +X {w}\n".encode() + b"\0" * 64


def bmp_core_header(w: int, h: int) -> bytes:
    """OS/2 ``BITMAPCOREHEADER`` (12 bytes, 16-bit sizes)."""
    return b"BM" + struct.pack("<IHHI", 26 + 64, 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24) + b"\0" * 64


def bmp_info_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, w, -h, 1, 24, 0, 0, 2835, 2835, 0, 0) + b"\0" * 64)


def webp_vp8x_header(w: int, h: int) -> bytes:
    chunk = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk) + 64) + b"WEBP" + chunk + b"\0" * 64


def gif_header(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b"\0" * 64


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def jp2_header(w: int, h: int) -> bytes:
    sig = _box(b"jP  ", b"\r\n\x87\n")
    ftyp = _box(b"ftyp", b"jp2 " + b"\0\0\0\0" + b"jp2 ")
    ihdr = _box(b"ihdr", struct.pack(">IIHBBBB", h, w, 3, 7, 7, 0, 0))
    return sig + ftyp + _box(b"jp2h", ihdr) + b"\0" * 64


def j2k_header(w: int, h: int) -> bytes:
    siz = struct.pack(">HIIIIIIIIH", 0, w, h, 0, 0, w, h, 0, 0, 3) + b"\x07\x01\x01" * 3
    return b"\xff\x4f\xff\x51" + struct.pack(">H", 2 + len(siz)) + siz + b"\0" * 64


def avif_header(w: int, h: int) -> bytes:
    ftyp = _box(b"ftyp", b"avif" + b"\0\0\0\0" + b"avifmif1miaf")
    ispe = _box(b"ispe", b"\0\0\0\0" + struct.pack(">II", w, h))
    meta = _box(b"meta", b"\0\0\0\0" + _box(b"iprp", _box(b"ipco", ispe)))
    return ftyp + meta + b"\0" * 64


def png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">II5B", w, h, 8, 2, 0, 0, 0))


# file name -> builder(w, h): every container/codec OpenCV's imdecode reads in this build
HEADERS = {
    "le.tif": lambda w, h: tiff_header(w, h),
    "be.tiff": lambda w, h: tiff_header(w, h, big_endian=True),
    "gray.pgm": lambda w, h: pnm_header(w, h, "P5"),
    "color.ppm": lambda w, h: pnm_header(w, h, "P6"),
    "tuple.pam": lambda w, h: pnm_header(w, h, "P7"),
    "float.pfm": lambda w, h: pnm_header(w, h, "PF"),
    "sun.ras": sun_raster_header,
    "radiance.hdr": hdr_header,
    "os2.bmp": bmp_core_header,
    "info.bmp": bmp_info_header,
    "canvas.webp": webp_vp8x_header,
    "anim.gif": gif_header,
    "boxed.jp2": jp2_header,
    "stream.j2k": j2k_header,
    "still.avif": avif_header,
    "plain.png": png_header,
}

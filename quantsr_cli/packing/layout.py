"""Bit layouts of packed weight codes (the CUDA kernels and the CPU backend read these).

A quantized weight is stored as unsigned codes ``u`` in ``[0, 2**bits - 1]`` and dequantized as
``scale * (u - zero)`` (the *unsigned-offset* convention: a signed weight grid ``-2**(b-1) .. 2**(b-1)-1``
is stored with ``zero = 2**(b-1)``; DoReFa-style symmetric grids use a half-integer ``zero``).
Codes are laid out in rows: a linear weight ``(O, I)`` is ``O`` rows of ``K = I`` codes; a conv weight
``(O, I, kh, kw)`` is first reordered to ``(O, kh, kw, I)`` (OHWI, channels-last) and flattened to
``O`` rows of ``K = kh * kw * I`` codes. Each row is packed on its own, so row ``o`` starts at byte
``o * ceil(K * bits / 8)``.
"""

from __future__ import annotations

from enum import Enum

import torch

__all__ = [
    "PackFormat",
    "pack_codes",
    "unpack_codes",
    "packed_row_bytes",
    "conv_weight_to_rows",
    "rows_to_conv_weight",
]


class PackFormat(str, Enum):
    """How a row of unsigned weight codes is laid out in bytes (the value is stored in file metadata).

    Every member's ``__doc__`` states its order, padding and offset convention.
    """

    U2_ROW_LSB = "u2_row_lsb"
    U4_ROW_LSB = "u4_row_lsb"
    U8_ROW = "u8_row"

    @property
    def bits(self) -> int:
        """Bits per code (2, 4 or 8)."""
        return _BITS[self]

    @classmethod
    def for_bits(cls, bits: int) -> PackFormat:
        """The format that stores ``bits``-bit codes.

        Raises:
            ValueError: for a bit-width other than 2, 4 or 8.
        """
        for fmt, b in _BITS.items():
            if b == bits:
                return fmt
        raise ValueError(f"no pack format for {bits}-bit codes (2, 4 or 8)")


_BITS = {PackFormat.U2_ROW_LSB: 2, PackFormat.U4_ROW_LSB: 4, PackFormat.U8_ROW: 8}

PackFormat.U2_ROW_LSB.__doc__ = (
    "2-bit codes, 4 per byte, LSB first: code ``j`` of a row is in byte ``j // 4`` at bit offset "
    "``(j % 4) * 2``. Each row is padded with zero bits to a whole byte, so a row of ``K`` codes takes "
    "``ceil(K / 4)`` bytes. Codes are unsigned offsets ``0..3``; the weight is ``scale * (u - zero)``."
)
PackFormat.U4_ROW_LSB.__doc__ = (
    "4-bit codes, 2 per byte, LSB first: code ``j`` of a row is in byte ``j // 2``, in the low nibble "
    "for even ``j`` and the high nibble for odd ``j``. Each row is padded with a zero nibble to a whole "
    "byte: ``ceil(K / 2)`` bytes per row. Codes are unsigned offsets ``0..15``; weight ``scale * (u - zero)``."
)
PackFormat.U8_ROW.__doc__ = (
    "8-bit codes, one byte each in row order: ``K`` bytes per row, no padding. Codes are unsigned "
    "offsets ``0..255``; the weight is ``scale * (u - zero)``."
)


def _check_bits(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits}: packing supports 2, 4 or 8")
    return 8 // bits


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` codes: ``ceil(k * bits / 8)``."""
    per = _check_bits(bits)
    return -(-k // per)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack rows of unsigned codes, LSB first (see :class:`PackFormat`).

    Args:
        codes: ``uint8`` tensor ``(O, K)`` with values in ``[0, 2**bits - 1]``.
        bits: 2, 4 or 8.

    Returns:
        ``uint8`` tensor ``(O, ceil(K * bits / 8))`` on the same device, padding bits zero.

    Raises:
        ValueError: wrong dtype/rank, unsupported bits, or a code that does not fit in ``bits``.
    """
    per = _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.contiguous().clone()
    rows, k = codes.shape
    nbytes = packed_row_bytes(k, bits)
    padded = torch.zeros(rows, nbytes * per, dtype=torch.int32, device=codes.device)
    padded[:, :k] = codes
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    # Bits of different codes never overlap, so the sum is a bitwise OR.
    return (padded.view(rows, nbytes, per) << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: ``uint8`` tensor ``(O, ceil(k * bits / 8))``.
        bits: 2, 4 or 8.
        k: codes per row (the padding after code ``k - 1`` is dropped).

    Returns:
        ``uint8`` tensor ``(O, k)`` with values in ``[0, 2**bits - 1]``.

    Raises:
        ValueError: wrong dtype/rank/width or unsupported bits.
    """
    per = _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_row_bytes(k, bits):
        raise ValueError(f"packed rows have {packed.shape[1]} bytes; {k} {bits}-bit codes need {packed_row_bytes(k, bits)}")
    if bits == 8:
        return packed.contiguous().clone()
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(packed.shape[0], -1)[:, :k].contiguous()


def conv_weight_to_rows(weight: torch.Tensor) -> torch.Tensor:
    """Reorder a conv weight ``(O, I, kh, kw)`` to rows ``(O, kh * kw * I)`` (OHWI order)."""
    if weight.dim() != 4:
        raise ValueError(f"conv weight must be 4-D, got {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1).contiguous()


def rows_to_conv_weight(rows: torch.Tensor, shape: tuple[int, int, int, int] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_rows`: rows ``(O, kh * kw * I)`` -> weight ``(O, I, kh, kw)``."""
    o, i, kh, kw = (int(s) for s in shape)
    if tuple(rows.shape) != (o, kh * kw * i):
        raise ValueError(f"rows {tuple(rows.shape)} do not match conv shape {(o, i, kh, kw)}")
    return rows.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()

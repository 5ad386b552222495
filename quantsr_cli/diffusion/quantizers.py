"""Range quantizers of the diffusion engine: learnable-boundary (LBQ) and LSQ(+) step quantizers.

**Interface** (what :mod:`.qlayers` relies on; a new kind = one :class:`RangeQuantizer` subclass plus one
:data:`QUANTIZERS` line). A range quantizer is an ``nn.Module`` holding one range per tensor
(``channel_axis=None``, activations) or per output channel (``channel_axis=0``, weights), with:

- ``bits``, ``levels = 2**bits - 1`` and an ``initialized`` bool buffer (a loaded checkpoint is never
  re-initialised);
- ``init_range(lo, hi)``: initialise from observed statistics (activations, after calibration);
- ``init_from_tensor(x)``: initialise from the tensor itself (weights);
- ``forward(x)``: fake-quantize, same shape and dtype, rounding with the shared
  :func:`quantsr_cli.quant.primitives.round_ste` (identity gradient);
- learnable parameters only as *relative offsets* initialised at 0 (initial range in buffers), so one
  Adam learning rate suits every layer whatever its value range.

Kinds (:data:`QUANTIZERS`):

- ``lbq`` :class:`LBQuantizer` (PassionSR/QArtSR "learnable boundary"): learnable ``lo, hi``;
  ``delta = (hi - lo) / (2**b - 1)``, ``zp = round(lo / delta)``,
  ``q = clamp(round(x / delta) - zp, 0, 2**b - 1)``, ``x_hat = (q + zp) * delta``.
- ``lsq`` :class:`LSQQuantizer` (LSQ for weights, LSQ+ for activations): learnable step ``s`` (and offset
  ``beta`` for activations); ``x_hat = s * clamp(round((x - beta) / s), qmin, qmax) + beta``.
  Weights are symmetric signed (``qmin = -2**(b-1)``), initialised with LSQ's ``2 mean|w| / sqrt(qmax)``;
  activations are unsigned with a min/max initialisation (LSQ+).

Why they are not methods of :mod:`quantsr_cli.quant`: they are per output channel with a per-channel
zero point (LBQ), take 2-8 bits (3 and 6 too), initialise from calibration statistics rather than the
first batch, and have no packed export format (``packing`` stores one float ``zero`` per layer); the
``quant`` LSQ (per tensor, LSQ gradient scaling, lazy init) is a different quantizer that shares the name.
"""

from __future__ import annotations

import torch
from torch import nn

from quantsr_cli.quant.primitives import round_ste, signed_range, unsigned_range


class RangeObserver:
    """Running per-channel statistics of a tensor, used to initialise quantizers and smoothing.

    Keeps the absolute min/max, an EMA of the per-batch min/max (``momentum``; PassionSR uses 0.95)
    and the EMA of the per-channel ``max|x|``. ``channel_dim=None`` gives per-tensor statistics.
    """

    def __init__(self, channel_dim: int | None, momentum: float = 0.95) -> None:
        self.channel_dim = channel_dim
        self.momentum = momentum
        self.stats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.channel_dim is None:
            flat = x.reshape(1, -1)
        else:
            flat = x.movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)
        cur = {"min": flat.amin(dim=1), "max": flat.amax(dim=1)}
        cur["absmax"] = torch.maximum(cur["max"].abs(), cur["min"].abs())
        if not self.stats:
            self.stats = {"abs_min": cur["min"], "abs_max": cur["max"], "ema_min": cur["min"],
                          "ema_max": cur["max"], "ema_absmax": cur["absmax"]}
            return
        m = self.momentum
        s = self.stats
        s["abs_min"] = torch.minimum(s["abs_min"], cur["min"])
        s["abs_max"] = torch.maximum(s["abs_max"], cur["max"])
        s["ema_min"] = m * s["ema_min"] + (1 - m) * cur["min"]
        s["ema_max"] = m * s["ema_max"] + (1 - m) * cur["max"]
        s["ema_absmax"] = m * s["ema_absmax"] + (1 - m) * cur["absmax"]

    @property
    def ready(self) -> bool:
        return bool(self.stats)

    def range(self, mode: str = "ema") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``(lo, hi)``; ``mode`` ``"ema"`` (PassionSR) or ``"minmax"`` (absolute)."""
        key = "ema" if mode == "ema" else "abs"
        return self.stats[f"{key}_min"], self.stats[f"{key}_max"]


class RangeQuantizer(nn.Module):
    """Base of the range quantizers (the interface in the module docstring): bit-width, channel layout
    and the ``initialized`` buffer."""

    def __init__(self, bits: int, num_channels: int = 1, channel_axis: int | None = None) -> None:
        super().__init__()
        self.bits = int(bits)
        self.channel_axis = channel_axis
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._num_channels = num_channels

    @classmethod
    def create(cls, bits: int, num_channels: int, channel_axis: int | None, is_weight: bool) -> RangeQuantizer:
        """Build one for a weight (``is_weight``) or an activation; subclasses may treat them differently."""
        return cls(bits, num_channels, channel_axis)

    @property
    def levels(self) -> int:
        return unsigned_range(self.bits)[1]

    @torch.no_grad()
    def init_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def init_from_tensor(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Reshape a per-channel vector to broadcast against ``x`` along ``channel_axis``."""
        if self.channel_axis is None or t.numel() == 1:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return t.reshape(shape)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` flattened to ``(C, -1)`` along ``channel_axis`` (``(1, -1)`` per tensor)."""
        if self.channel_axis is None:
            return x.detach().reshape(1, -1)
        return x.detach().movedim(self.channel_axis, 0).reshape(x.shape[self.channel_axis], -1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self._num_channels}, axis={self.channel_axis}"


class LBQuantizer(RangeQuantizer):
    """Asymmetric uniform quantizer with learnable boundaries ``lo <= hi`` (PassionSR LBQ).

    Parameters ``d_lo, d_hi`` are offsets in units of the initial range: ``lo = lo0 + r0 * d_lo``,
    ``hi = hi0 + r0 * d_hi`` with ``r0 = hi0 - lo0``.
    """

    def __init__(self, bits: int, num_channels: int = 1, channel_axis: int | None = None) -> None:
        super().__init__(bits, num_channels, channel_axis)
        self.register_buffer("lo0", torch.zeros(num_channels))
        self.register_buffer("hi0", torch.ones(num_channels))
        self.d_lo = nn.Parameter(torch.zeros(num_channels))
        self.d_hi = nn.Parameter(torch.zeros(num_channels))

    @torch.no_grad()
    def init_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set the initial range (per channel or scalar); ``hi - lo >= 1e-6`` is enforced."""
        lo = lo.detach().float().reshape(-1).expand(self.lo0.numel()).clone()
        hi = hi.detach().float().reshape(-1).expand(self.hi0.numel()).clone()
        hi = torch.maximum(hi, lo + 1e-6)
        self.lo0.copy_(lo)
        self.hi0.copy_(hi)
        self.d_lo.zero_()
        self.d_hi.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from_tensor(self, x: torch.Tensor) -> None:
        """Min/max initialisation from ``x`` itself (weights: per output channel)."""
        flat = self._reduce(x)
        self.init_range(flat.amin(dim=1), flat.amax(dim=1))

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        r0 = self.hi0 - self.lo0
        return self.lo0 + r0 * self.d_lo, self.hi0 + r0 * self.d_hi

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.bounds()
        delta = (hi - lo).clamp_min(1e-8) / self.levels
        zp = round_ste(lo / delta)
        return self._view(delta, x), self._view(zp, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any shape); returns the same shape and dtype."""
        delta, zp = self._params(x)
        q = torch.clamp(round_ste(x / delta) - zp, 0, self.levels)
        return (q + zp) * delta

    @torch.no_grad()
    def export(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer form of ``forward(x)``: ``(codes uint8, scale (C,), zero (C,))`` with
        ``x_hat = scale * (codes - zero)`` (``zero = -zp``, an integer)."""
        delta, zp = self._params(x)
        codes = torch.clamp(torch.round(x / delta) - zp, 0, self.levels).to(torch.uint8)
        return codes, delta.reshape(-1).float(), (-zp).reshape(-1).float()


class LSQQuantizer(RangeQuantizer):
    """LSQ step quantizer: symmetric signed for weights, LSQ+ (unsigned + offset) for activations.

    ``s = s0 * exp(d_s)`` and ``beta = beta0 + s0 * d_beta`` (activations only).
    """

    def __init__(self, bits: int, num_channels: int = 1, channel_axis: int | None = None,
                 signed: bool = True) -> None:
        super().__init__(bits, num_channels, channel_axis)
        self.signed = signed
        self.register_buffer("s0", torch.ones(num_channels))
        self.register_buffer("beta0", torch.zeros(num_channels))
        self.d_s = nn.Parameter(torch.zeros(num_channels))
        self.d_beta = nn.Parameter(torch.zeros(num_channels), requires_grad=not signed)

    @classmethod
    def create(cls, bits: int, num_channels: int, channel_axis: int | None, is_weight: bool) -> LSQQuantizer:
        """Weights symmetric signed (LSQ), activations unsigned with an offset (LSQ+)."""
        return cls(bits, num_channels, channel_axis, signed=is_weight)

    @property
    def qmin(self) -> int:
        return (signed_range if self.signed else unsigned_range)(self.bits)[0]

    @property
    def qmax(self) -> int:
        return (signed_range if self.signed else unsigned_range)(self.bits)[1]

    @torch.no_grad()
    def init_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """LSQ+ activation init: ``s = (hi - lo) / (2**b - 1)``, ``beta = lo`` (unsigned codes)."""
        lo = lo.detach().float().reshape(-1).expand(self.s0.numel())
        hi = hi.detach().float().reshape(-1).expand(self.s0.numel())
        self.s0.copy_(((hi - lo) / self.levels).clamp_min(1e-8))
        self.beta0.copy_(lo if not self.signed else torch.zeros_like(lo))
        self.d_s.zero_()
        self.d_beta.zero_()
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from_tensor(self, x: torch.Tensor) -> None:
        """LSQ weight init ``s = 2 mean|x| / sqrt(qmax)`` per channel (signed, no offset)."""
        flat = self._reduce(x)
        qmax = max(self.qmax, 1)
        self.s0.copy_((2.0 * flat.abs().mean(dim=1) / qmax**0.5).clamp_min(1e-8))
        self.beta0.zero_()
        self.d_s.zero_()
        self.d_beta.zero_()
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` (any shape); returns the same shape and dtype."""
        s = self._view(self.s0 * torch.exp(self.d_s), x)
        beta = self._view(self.beta0 + self.s0 * self.d_beta, x)
        q = torch.clamp(round_ste((x - beta) / s), self.qmin, self.qmax)
        return q * s + beta


QUANTIZERS: dict[str, type[RangeQuantizer]] = {"lbq": LBQuantizer, "lsq": LSQQuantizer}
"""Quantizer kinds by name (``QuantSpec.quantizer``)."""


def make_quantizer(kind: str, bits: int, num_channels: int = 1, channel_axis: int | None = None,
                   is_weight: bool = False) -> RangeQuantizer:
    """Build a registered quantizer (:data:`QUANTIZERS`) for a weight or an activation."""
    if kind not in QUANTIZERS:
        raise ValueError(f"unknown quantizer kind {kind!r}")
    return QUANTIZERS[kind].create(bits, num_channels, channel_axis, is_weight)

"""Weight quantizers: learned-step (LSQ, QuantSR RLQ), QuantSR+ RBD bit decomposition, DoReFa, PAMS.

All are per-tensor. Each ``forward(weight)`` equals ``scale * (codes - zero)`` of ``export(weight)``
bit-exactly. Weight quantizers needing a step initialise it from the weight itself on the first
forward (training or eval) or export, so no data is required.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantsr_cli.errors import CheckpointError
from quantsr_cli.quant.base import WeightParams, WeightQuantizer, to_codes
from quantsr_cli.quant.primitives import (
    fake_quant,
    grad_scale,
    lsq_grad_factor,
    lsq_init_step,
    mse_step,
    phi_surrogate,
    sign_ste,
    signed_range,
    ste_surrogate,
)


class _StepWeightQuantizer(WeightQuantizer):
    """Common part of quantizers with an LSQ step ``α`` (init ``2·mean|W|/sqrt(Qp)``, grad scale
    ``g = 1/sqrt(numel(W)·Qp)``), ``Qp = 2**(b−1) − 1``."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.qp = 2 ** (bits - 1) - 1
        self.step = nn.Parameter(torch.ones(1))

    step_search = False
    """When True (set by ``calibrate_(..., step_search=True)``), the step is initialised by :func:`mse_step`."""

    @torch.no_grad()
    def _maybe_init(self, weight: Tensor) -> None:
        if not bool(self.initialized):
            self.step.copy_(lsq_init_step(weight, self.qp))
            if self.step_search:
                self.step.copy_(mse_step(weight, self.step, self._grid))
            self.initialized.fill_(True)

    def _grid(self, weight: Tensor, step: Tensor) -> Tensor:
        """``weight`` on this quantizer's grid of step ``step`` (the forward without the step's gradient scale)."""
        raise NotImplementedError

    def _scaled_step(self, weight: Tensor) -> Tensor:
        self._maybe_init(weight)
        return grad_scale(self.step, lsq_grad_factor(weight.numel(), self.qp))

    @property
    def packed_zero(self) -> float:
        """The ``zero`` of this quantizer's exported codes."""
        return float(2 ** (self.bits - 1))

    @torch.no_grad()
    def load_packed(self, scale: Tensor, zero: float) -> None:
        """``α`` = the stored per-tensor scale; the codes' ``zero`` must be this grid's."""
        if scale.numel() != 1:
            raise CheckpointError("per-channel weight scales cannot be rebuilt as a per-tensor quantizer")
        if zero != self.packed_zero:
            raise CheckpointError(f"codes with zero {zero:g} do not fit {self.method} W{self.bits}")
        self.step.copy_(scale.reshape(self.step.shape))
        self.initialized.fill_(True)


class LSQWeightQuantizer(_StepWeightQuantizer):
    """LSQ weights (released ``Conv2dLSQ``): ``α·clamp(round(W/α), −2**(b−1), 2**(b−1)−1)``, plain STE.

    Export: ``codes = k + 2**(b−1)``, ``zero = 2**(b−1)``, ``scale = α``.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method = "lsq"
    surrogate = "ste"

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize a weight of any shape; returns the same shape."""
        return self._grid(weight, self._scaled_step(weight))

    def _grid(self, weight: Tensor, step: Tensor) -> Tensor:
        qmin, qmax = signed_range(self.bits)
        surrogate = phi_surrogate if self.surrogate == "phi" else ste_surrogate
        return fake_quant(weight, step, qmin, qmax, None, surrogate)

    @torch.no_grad()
    def export(self, weight: Tensor) -> WeightParams:
        self._maybe_init(weight)
        qmin, qmax = signed_range(self.bits)
        k = torch.clamp(torch.round(weight / self.step), qmin, qmax)
        scale = self.step.detach().float().reshape(1).clone()
        return WeightParams(to_codes(k, -qmin, self.bits), scale, float(-qmin))


class RLQWeightQuantizer(LSQWeightQuantizer):
    """QuantSR RLQ weights (``Conv2dOurs``): LSQ grid and step, rounding gradient ``φ'(frac)``.

    QuantSR has no weight shift; only the tanh surrogate differs from :class:`LSQWeightQuantizer`.
    """

    method = "rlq"
    surrogate = "phi"


class RBDWeightQuantizer(_StepWeightQuantizer):
    """QuantSR+ redistribution-driven bit determination (released ``multi_bit_round_pass``).

    With ``w' = 2W/α`` and learnable per-bit scales ``s_i`` (init 1) and thresholds ``β_i`` (init 0),
    bits are decided MSB → LSB::

        b_{n−1} = sign(s_{n−1}·(w' − 1) − β_{n−1})
        b_i     = sign(s_i·(w' − 1 − Σ_{j>i} s_j·b_j·2^j) − β_i),   i = n−2 … 0
        W_q     = α·(Σ_i b_i·2^i + 1)/2

    ``sign`` is :func:`~quantsr_cli.quant.primitives.sign_ste`: forward ``±1`` with ``sign(0) = +1``,
    gradient ``1_{|x|≤1}``. The gradient is the compiled release's (the ``.py`` source's ``bool_pass``
    is broken, defect (a)); its forward is ``torch.sign``, so **sign(0) differs**: the release has
    ``sign(0) = 0``, which at an exact tie zeroes a bit and yields an off-grid half level (with
    ``s = 1, β = 0``: ``W/α = k + ½`` inside the grid stays ``k + ½``, e.g. 2 bit 0.5 → 0.5, 1.5 → 1.5),
    a value no n-bit code holds. quantsr rounds such ties up (0.5 → 1, 1.5 → 2) so that every weight
    lies on the grid and packs exactly; everywhere else, and in every gradient, the two agree.
    The final sum uses plain ``2^i``, not ``s_i``. With ``s = 1, β = 0`` this is the
    uniform grid ``{−2**(n−1)+1, …, 2**(n−1)}·α`` (4 bit: −7…8) with half-up rounding and saturation
    without an explicit clamp. ``α`` follows LSQ (``Qp = 2**(n−1) − 1`` for init and ``g`` only).

    Export: integer level ``k = (Σ b_i 2^i + 1)/2``, ``codes = k + 2**(n−1) − 1``,
    ``zero = 2**(n−1) − 1``, ``scale = α``.

    Args:
        bits: number of bits ``n`` in {2, 4, 8}.
    """

    method = "rbd"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.zero = float(2 ** (bits - 1) - 1)
        self.bit_scale = nn.Parameter(torch.ones(bits))
        self.bit_bias = nn.Parameter(torch.zeros(bits))

    @property
    def packed_zero(self) -> float:
        return self.zero

    @torch.no_grad()
    def load_packed(self, scale: Tensor, zero: float) -> None:
        """As the LSQ step, and ``s_i = 1``, ``β_i = 0``: the uniform grid the codes index (their initial
        values; the learned ones are not stored in a packed file)."""
        super().load_packed(scale, zero)
        self.bit_scale.fill_(1.0)
        self.bit_bias.fill_(0.0)

    def levels(self, weight: Tensor, step: Tensor) -> Tensor:
        """Integer levels ``k ∈ [−2**(n−1)+1, 2**(n−1)]`` (float, exact) with STE gradients.

        Args:
            weight: any shape.
            step: ``α``, shape ``(1,)``.
        """
        n = self.bits
        w = weight / step * 2
        s = [self.bit_scale[i] for i in range(n)]
        beta = [self.bit_bias[i] for i in range(n)]
        bits: list[Tensor | None] = [None] * n
        for i in range(n - 1, -1, -1):
            resid = w - 1
            for j in range(i + 1, n):  # same summation order as the release
                resid = resid - bits[j] * s[j] * (2**j)
            bits[i] = sign_ste(resid * s[i] - beta[i])
        total = sum(bits[i] * (2**i) for i in range(n))
        return (total - 1) / 2 + 1

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize a weight of any shape; returns the same shape."""
        return self._grid(weight, self._scaled_step(weight))

    def _grid(self, weight: Tensor, step: Tensor) -> Tensor:
        return step * self.levels(weight, step)

    @torch.no_grad()
    def export(self, weight: Tensor) -> WeightParams:
        self._maybe_init(weight)
        k = self.levels(weight, self.step)
        scale = self.step.detach().float().reshape(1).clone()
        return WeightParams(to_codes(k, self.zero, self.bits), scale, self.zero)


class DoReFaWeightQuantizer(WeightQuantizer):
    """DoReFa weights as released (``weight_quantize_fn``), ``L = 2**k − 1``::

        t = tanh(W),  m = max|t| (detached),  W_q = m·(2·round_k(t/(2m) + 0.5) − 1)

    The released code rescales by ``m`` (original DoReFa does not). Rounding has the identity STE, so
    ``dW_q/dW = 1 − tanh²(W)``. To make ``W_q = scale·(u − zero)`` exact, the forward is computed as
    ``(2m/L)·(r − L/2)`` with ``r = round((t/(2m) + 0.5)·L)`` — algebraically the release's formula
    (float32 results may differ by an ulp). Export: ``codes = r``, ``scale = 2m/L``,
    ``zero = L/2`` (half-integer). ``m`` is floored at 1e-8 for an all-zero weight.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.levels = 2**bits - 1
        self.zero = self.levels / 2
        self.initialized.fill_(True)

    def _parts(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = torch.tanh(weight)
        m = t.detach().abs().max().clamp_min(1e-8)
        r = torch.round((t.detach() / 2 / m + 0.5) * self.levels)
        scale = (2 * m / self.levels).reshape(1)
        return t, r, scale

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize a weight of any shape; returns the same shape."""
        t, r, scale = self._parts(weight)
        return scale * (r - self.zero) + (t - t.detach())

    @torch.no_grad()
    def export(self, weight: Tensor) -> WeightParams:
        _, r, scale = self._parts(weight)
        return WeightParams(r.to(torch.uint8), scale.float().clone(), self.zero)


class PAMSWeightQuantizer(WeightQuantizer):
    """PAMS weights (``quant_weight``): ``W_q = round(W·q/M)·M/q``, ``M = max|W| + 1e-8`` (detached),
    ``q = 2**(k−1) − 1``, identity STE for the whole map (``dW_q/dW = 1``).

    Computed as ``(M/q)·r`` with ``r = round(W·q/M)`` (same value up to float32 rounding) so that
    export is exact: ``codes = r + q``, ``zero = q``, ``scale = M/q``. 2 bits give the ternary grid
    ``{−M, 0, M}``.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method = "pams"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.qmax = 2 ** (bits - 1) - 1
        self.initialized.fill_(True)

    def _parts(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        w = weight.detach()
        m = w.abs().max() + 1e-8
        r = torch.clamp(torch.round(w * self.qmax / m), -self.qmax, self.qmax)
        return r, (m / self.qmax).reshape(1)

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize a weight of any shape; returns the same shape."""
        r, scale = self._parts(weight)
        return scale * r + (weight - weight.detach())

    @torch.no_grad()
    def export(self, weight: Tensor) -> WeightParams:
        r, scale = self._parts(weight)
        return WeightParams(to_codes(r, float(self.qmax), self.bits), scale.float().clone(), float(self.qmax))

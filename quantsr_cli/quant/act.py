"""Activation quantizers: learned-step (LSQ / QuantSR RLQ / QuantSR+ RBD), DoReFa and PAMS.

Each forward equals ``step * clamp(round((x + shift) / step), qmin, qmax)`` bit-exactly for the
parameters returned by ``export()`` (PAMS: outside its short EMA warm-up, see
:class:`PAMSActQuantizer`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantsr_cli.config import ACT_SIGN_RULES
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.quant.base import ActParams, ActQuantizer
from quantsr_cli.quant.primitives import (
    Surrogate,
    fake_quant,
    grad_scale,
    lsq_grad_factor,
    lsq_init_step,
    mse_step,
    phi_surrogate,
    signed_range,
    ste_surrogate,
    unsigned_range,
)

SIGNED_THRESHOLD = -1e-5
"""A first batch whose minimum (after the shift) is below this makes the quantizer signed."""

PAMS_EMA_STEPS = 30
"""Training batches over which PAMS sets its clip from an EMA of the activation maximum."""

PAMS_EMA_DECAY = 0.9
"""EMA decay for :data:`PAMS_EMA_STEPS` (PAMS uses 0.9997 over a whole epoch)."""


def _mse_of_grid(x: Tensor, qmin: int, qmax: int) -> float:
    """Mean squared error of fake-quantizing ``x`` on ``[qmin, qmax]`` at the LSQ initial step."""
    return float((fake_quant(x, lsq_init_step(x, qmax), qmin, qmax) - x).square().mean())


class LearnedStepActQuantizer(ActQuantizer):
    """LSQ activation quantizer with optional RLQ shift (methods ``lsq``, ``rlq``, ``rbd``).

    ``x_hat = α · clamp(round((x + τ̂) / α), Qn, Qp)`` with a learnable per-tensor step ``α`` and,
    for RLQ/RBD, a learnable per-input-channel shift ``τ̂`` (init 0). The shift is added before
    quantization and **never subtracted** afterwards (QuantSR ``channel_threshold``).

    Initialisation (released ``ActOurs``/``ActLSQ``): on the first batch, *after* the shift, the
    quantizer becomes signed (``Qn, Qp = −2**(b−1), 2**(b−1)−1``) if ``min < −1e-5`` and unsigned
    (``0, 2**b−1``) otherwise (``sign_rule="min"``), and ``α = 2·mean|x| / sqrt(Qp)``. With
    ``sign_rule="mse"`` (our option, not in the release) the grid whose LSQ-initialised fake
    quantization of the batch has the lower MSE wins: after a LeakyReLU (IMDN) the release's rule
    makes every quantizer signed although the negative tail is tiny, which leaves a 2-bit grid
    only one positive level. Both are stored in buffers
    (``signed``, ``initialized``) so a loaded checkpoint is never re-initialised. Unlike the release,
    which initialises only on the first *training* forward and otherwise quantizes with an
    uninitialised ``torch.Tensor(1)`` (defect (i)), a first forward in eval mode initialises too.

    Gradients: ``α`` gets LSQ's gradient times ``g = 1/sqrt(N·Qp)``, ``N = x.numel()`` (batch
    included); rounding uses the plain STE (``lsq``, ``rbd``: QuantSR+ dropped the tanh surrogate for
    activations) or the RLQ tanh surrogate ``φ`` (``rlq``); ``x`` and ``τ̂`` get zero gradient
    outside the clip range.

    Args:
        bits: bit-width in {2, 4, 8}.
        shift_shape: shape of ``τ̂`` (``(1, C, 1, 1)`` for conv inputs, ``(C,)`` for linear inputs),
            or ``None`` for no shift (per-tensor attention points).
        sign_rule: ``"min"`` (release) or ``"mse"``, see above.
    """

    surrogate = "ste"
    channel_shift = True
    """Whether conv/linear inputs get the per-channel shift ``τ̂`` (RLQ, RBD) or not (LSQ)."""

    @classmethod
    def create(cls, bits: int, shift_shape: tuple[int, ...] | None = None,
               sign_rule: str = "min") -> LearnedStepActQuantizer:
        return cls(bits, shift_shape if cls.channel_shift else None, sign_rule)

    def __init__(self, bits: int, shift_shape: tuple[int, ...] | None = None, sign_rule: str = "min") -> None:
        super().__init__(bits)
        if sign_rule not in ACT_SIGN_RULES:
            raise ConfigError(f"unknown activation sign rule {sign_rule!r}; choose one of {', '.join(ACT_SIGN_RULES)}")
        self.sign_rule = sign_rule
        self._surrogate: Surrogate = phi_surrogate if self.surrogate == "phi" else ste_surrogate
        self.step = nn.Parameter(torch.ones(1))
        self.shift = None if shift_shape is None else nn.Parameter(torch.zeros(shift_shape))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))

    step_search = False
    """When True (set by ``calibrate_(..., step_search=True)``), the step is initialised by :func:`mse_step`
    on the first batch (after the sign rule), instead of LSQ's ``2·mean|x|/sqrt(Qp)``."""

    @property
    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` for the current signedness."""
        return signed_range(self.bits) if bool(self.signed) else unsigned_range(self.bits)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        if self.shift is not None:
            x = x + self.shift
        if self.sign_rule == "min":
            signed = bool(x.min() < SIGNED_THRESHOLD)
        else:
            signed = _mse_of_grid(x, *signed_range(self.bits)) < _mse_of_grid(x, *unsigned_range(self.bits))
        self.signed.fill_(signed)
        self.step.copy_(lsq_init_step(x, self.qrange[1]).to(self.step))
        if self.step_search:
            qmin, qmax = self.qrange
            self.step.copy_(mse_step(x, self.step, lambda t, s: fake_quant(t, s, qmin, qmax, None, ste_surrogate)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x``.

        Args:
            x: ``(N, C, H, W)`` conv input, ``(..., C)`` linear input, or any shape when there is no
                shift.

        Returns:
            Same shape, values on the grid ``step · [qmin, qmax]``.
        """
        if not bool(self.initialized):
            self._initialize(x)
        qmin, qmax = self.qrange
        step = grad_scale(self.step, lsq_grad_factor(x.numel(), qmax))
        return fake_quant(x, step, qmin, qmax, self.shift, self._surrogate)

    @torch.no_grad()
    def export(self) -> ActParams:
        self._require_initialized()
        qmin, qmax = self.qrange
        shift = None if self.shift is None else self.shift.detach().reshape(-1).float().clone()
        return ActParams(self.bits, self.step.detach().float().reshape(1).clone(), qmin, qmax, shift)

    @torch.no_grad()
    def load_packed(self, params: ActParams) -> None:
        """Signedness (from ``qmin``), step and shift as stored (no shift stored: ``τ̂ = 0``)."""
        self.signed.fill_(params.qmin < 0)
        if (params.qmin, params.qmax) != self.qrange:
            raise CheckpointError(f"activation code range [{params.qmin}, {params.qmax}] is not the {self.bits}-bit "
                                  "signed or unsigned grid")
        self.step.copy_(params.step.reshape(self.step.shape))
        if params.shift is not None:
            if self.shift is None or self.shift.numel() != params.shift.numel():
                raise CheckpointError("the stored shift does not fit the model's quantizer")
            self.shift.copy_(params.shift.reshape(self.shift.shape))
        elif self.shift is not None:
            self.shift.zero_()
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        shift = None if self.shift is None else tuple(self.shift.shape)
        return f"bits={self.bits}, surrogate={self.surrogate}, shift={shift}, sign_rule={self.sign_rule}"


class LSQActQuantizer(LearnedStepActQuantizer):
    """LSQ (Esser et al. 2020, released ``ActLSQ``): learned step, plain STE, no shift."""

    method = "lsq"
    channel_shift = False


class RLQActQuantizer(LearnedStepActQuantizer):
    """QuantSR RLQ (``ActOurs`` + ``channel_threshold``): learned step and shift, tanh surrogate ``φ``."""

    method = "rlq"
    surrogate = "phi"


class RBDActQuantizer(LearnedStepActQuantizer):
    """QuantSR+ activations: RLQ's learned step and shift with the plain STE (no ``φ``)."""

    method = "rbd"


class DoReFaActQuantizer(ActQuantizer):
    """DoReFa activation quantizer ``round_k(clamp(x, 0, 1))``, ``round_k(u) = round(u·L)/L``, ``L = 2**k − 1``.

    No learnable state; always unsigned in ``[0, 1]`` (negative inputs, e.g. a residual stream or
    attention q/k, are zeroed: that is the released baseline's behaviour). Identity STE inside
    ``[0, 1]``, zero gradient outside (clamp).

    The forward is computed as ``step · clamp(round(x / step), 0, L)`` with ``step = float32(1/L)``,
    algebraically the released ``round(clamp(x,0,1)·L)/L``; results can differ from the release by
    one float32 ulp or, at exact rounding ties, by one level.

    Args:
        bits: bit-width in {2, 4, 8}.
    """

    method = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.levels = 2**bits - 1
        self.initialized.fill_(True)

    def _step(self, like: Tensor) -> Tensor:
        return torch.full((1,), 1.0 / self.levels, dtype=like.dtype, device=like.device)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (any shape) to ``{0, 1/L, ..., 1}``."""
        return fake_quant(x, self._step(x), 0, self.levels)

    def export(self) -> ActParams:
        return ActParams(self.bits, self._step(torch.empty(0)), 0, self.levels, None)


class PAMSActQuantizer(ActQuantizer):
    """PAMS activation quantizer: learnable symmetric clip ``α`` (init 10), ``q = 2**(k−1) − 1``.

    ``x_hat = round(clamp(x, −α, α)·q/α)·α/q``, computed as ``step·clamp(round(x/step), −q, q)``
    with ``step = α/q`` (same value up to float32 rounding; PAMS's identity-STE gradients: 1 for
    ``x`` inside the clip, ``α`` gets ``(round(v) − v)/q`` inside and ``±1`` outside, no LSQ scale).

    Warm-up (PAMS ``ema_epoch``): during the first ``ema_steps`` *training* batches ``α`` is set to
    an EMA of the batch mean of per-sample ``max|x|`` and ``x`` is quantized **unclipped**
    (``round(x/step)·step``), with ``α`` detached. PAMS uses decay 0.9997 over a whole epoch;
    our runs are short, so the default is decay 0.9 over 30 batches (the first batch sets the value).
    A forward in eval mode before any batch initialises ``α`` from that batch (counted as one EMA
    step) instead of using the arbitrary 10. Eval mode always clips, so ``export()`` reproduces the
    eval forward, and the training forward once the warm-up is over.

    Args:
        bits: bit-width in {2, 4, 8}.
        ema_steps: warm-up length in training batches (>= 1).
        ema_decay: EMA decay in ``[0, 1)``.
    """

    method = "pams"

    def __init__(self, bits: int, ema_steps: int = PAMS_EMA_STEPS, ema_decay: float = PAMS_EMA_DECAY) -> None:
        super().__init__(bits)
        if ema_steps < 1 or not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"PAMS needs ema_steps >= 1 and 0 <= ema_decay < 1 (got {ema_steps}, {ema_decay})")
        self.ema_steps = ema_steps
        self.ema_decay = ema_decay
        self.qmax = 2 ** (bits - 1) - 1
        self.alpha = nn.Parameter(torch.full((1,), 10.0))
        self.register_buffer("ema_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _ema_update(self, x: Tensor) -> None:
        batch_max = x.detach().abs().reshape(x.shape[0], -1).amax(dim=1).mean().clamp_min(1e-8)
        if int(self.ema_count) == 0:
            new = batch_max
        else:
            new = self.ema_decay * self.alpha[0] + (1.0 - self.ema_decay) * batch_max
        self.alpha.fill_(float(new))
        self.ema_count += 1
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` of shape ``(N, ...)`` (the EMA statistic is per sample along dim 0)."""
        if self.training and int(self.ema_count) < self.ema_steps:
            self._ema_update(x)
            step = self.alpha.detach() / self.qmax
            return step * torch.round(x.detach() / step) + (x - x.detach())
        if not bool(self.initialized):
            self._ema_update(x)
        step = self.alpha / self.qmax
        return fake_quant(x, step, -self.qmax, self.qmax)

    @torch.no_grad()
    def export(self) -> ActParams:
        self._require_initialized()
        step = (self.alpha / self.qmax).detach().float().reshape(1).clone()
        return ActParams(self.bits, step, -self.qmax, self.qmax, None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema_steps={self.ema_steps}, ema_decay={self.ema_decay}"

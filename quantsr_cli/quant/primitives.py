"""Differentiable building blocks of every quantizer: STE rounding, the RLQ tanh surrogate, LSQ
gradient scaling, the clipped-STE sign, and the one fake-quantization formula.

All "straight-through" tricks here are written as ``forward_value + (surrogate - surrogate.detach())``.
The bracket is exactly ``0.0`` in IEEE arithmetic, so the forward value is *bit-identical* to the
plain (non-differentiable) formula, while the gradient is the surrogate's. The released QuantSR code
uses ``value.detach() - surrogate.detach() + surrogate``, which has the same gradient but can differ
from ``value`` in the last bit; bit-exactness matters here because packed inference
(:mod:`quantsr_cli.packing`) must reproduce the fake-quant forward exactly.

No function here hard-codes a device (the released ``round_pass`` calls ``.cuda()``, defect (h)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Surrogate = Callable[[Tensor], Tensor]
"""A function whose *gradient* replaces the zero gradient of rounding; its value is discarded."""

_PHI_NORM = 2.0 * math.tanh(0.5)


def phi(f: Tensor) -> Tensor:
    """RLQ backward transformation ``φ(f) = tanh(f − 0.5) / (2·tanh(0.5)) + 0.5`` (k = 1).

    Args:
        f: fractional parts, any shape, values in ``[0, 1)``.

    Returns:
        Same shape; ``φ(0) = 0``, ``φ(0.5) = 0.5``, ``φ(1) = 1``. Its derivative is
        ``φ'(f) = sech²(f − 0.5) / (2·tanh(0.5))``: 0.8509 at ``f = 0``, 1.0820 at ``f = 0.5``, with
        mean 1 over an interval (QuantSR ``round_pass``; k = 1 is hard-coded in the released code).
    """
    return torch.tanh(f - 0.5) / _PHI_NORM + 0.5


def ste_surrogate(v: Tensor) -> Tensor:
    """Plain straight-through estimator: gradient 1 everywhere."""
    return v


def phi_surrogate(v: Tensor) -> Tensor:
    """RLQ surrogate ``floor(v) + φ(frac(v))`` (floor detached): gradient ``φ'(frac(v))``."""
    fl = torch.floor(v).detach()
    return fl + phi(v - fl)


def _straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass (bit-exact), ``d surrogate`` in the backward pass."""
    return value.detach() + (surrogate - surrogate.detach())


def round_ste(x: Tensor) -> Tensor:
    """``torch.round(x)`` (half to even) forward, identity gradient."""
    return _straight_through(torch.round(x.detach()), x)


def round_phi(x: Tensor) -> Tensor:
    """``torch.round(x)`` forward, RLQ gradient ``φ'(frac(x))`` (derivative of ``floor(x) + φ(frac(x))``)."""
    return _straight_through(torch.round(x.detach()), phi_surrogate(x))


def grad_scale(x: Tensor, g: float) -> Tensor:
    """LSQ gradient scaling: forward value exactly ``x``, gradient multiplied by ``g``.

    Args:
        x: usually a step-size parameter of shape ``(1,)``.
        g: gradient factor, LSQ uses ``1 / sqrt(N · Qp)``.
    """
    scaled = x * g
    return x.detach() + (scaled - scaled.detach())


def sign_ste(x: Tensor) -> Tensor:
    """Binary sign with the clipped STE of BNNs (RBD bit decisions).

    Forward: ``+1`` where ``x >= 0`` and ``−1`` elsewhere: **sign(0) = +1** here. The released
    QuantSR+ code (its compiled ``bool_pass``) uses ``torch.sign``, which defines ``sign(0) = 0``: at
    an exact tie that bit is 0, not ±1, and the RBD level lands halfway between two grid levels
    (see :class:`~quantsr_cli.quant.weight.RBDWeightQuantizer`). quantsr keeps every bit binary so
    that every weight has an exact n-bit code to pack; ties round up. The two differ only at exact
    ties. Backward: gradient ``1`` where ``|x| <= 1``, ``0`` elsewhere (``d clamp(x, −1, 1)``), as released.

    Args:
        x: any shape.

    Returns:
        Same shape and dtype, values exactly ``±1``.
    """
    value = torch.where(x.detach() >= 0, 1.0, -1.0).to(x.dtype)
    # An explicit mask, not clamp(x, -1, 1): clamp's gradient at x = ±1 exactly differs between torch
    # releases (torch 2.14 gives 0 at the lower bound), and on-grid RBD weights sit exactly there.
    inside = (x.detach().abs() <= 1.0).to(x.dtype)
    return _straight_through(value, x * inside)


def fake_quant(
    x: Tensor,
    step: Tensor,
    qmin: int,
    qmax: int,
    shift: Tensor | None = None,
    surrogate: Surrogate = ste_surrogate,
) -> Tensor:
    """Uniform fake quantization, bit-identical to the packing reference.

    Forward value is exactly ``step * clamp(round((x + shift) / step), qmin, qmax)`` computed in
    that op order (add shift, divide, ``torch.round``, clamp, multiply). The gradient follows the
    released LSQ/QuantSR code, which rounds *after* clamping: ``surrogate(clamp(v, qmin, qmax))``,
    so ``x`` (and ``shift``) get zero gradient outside the clip range and the step gets the LSQ
    gradient ``round(v) − v`` inside, ``qmin``/``qmax`` outside (before any ``grad_scale``).

    Args:
        x: activations or weights, any shape.
        step: positive step size, shape ``(1,)`` (broadcast).
        qmin: lowest integer code (``−2**(b−1)`` signed, ``0`` unsigned).
        qmax: highest integer code.
        shift: ``None`` or a tensor broadcastable to ``x`` (added before quantization, never removed).
        surrogate: gradient shape of rounding, :func:`ste_surrogate` or :func:`phi_surrogate`.

    Returns:
        Tensor of ``x``'s shape with values in ``step · [qmin, qmax]``.
    """
    if shift is not None:
        x = x + shift
    v = x / step
    q_value = torch.clamp(torch.round(v.detach()), qmin, qmax)
    q = _straight_through(q_value, surrogate(torch.clamp(v, qmin, qmax)))
    return step * q


def lsq_init_step(x: Tensor, qp: int, eps: float = 1e-5) -> Tensor:
    """LSQ step initialisation ``2 · mean|x| / sqrt(Qp)``, floored at ``eps`` (all-zero inputs).

    Returns:
        Detached tensor of shape ``(1,)``.
    """
    return (2.0 * x.detach().abs().mean() / math.sqrt(qp)).clamp_min(eps).reshape(1)


def lsq_grad_factor(numel: int, qp: int) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N · Qp)`` (``N`` counts every element, batch included)."""
    return 1.0 / math.sqrt(max(numel, 1) * qp)


def signed_range(bits: int) -> tuple[int, int]:
    """``(−2**(b−1), 2**(b−1) − 1)``: the signed integer grid."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    """``(0, 2**b − 1)``: the unsigned integer grid."""
    return 0, 2**bits - 1


STEP_SEARCH_FACTORS = tuple(float(f) for f in torch.logspace(math.log10(0.25), math.log10(6.0), 48))
"""Multiples of the LSQ initial step tried by :func:`mse_step` (0.25 to 6, geometric)."""

STEP_SEARCH_ELEMENTS = 1 << 18
"""Elements a step search looks at: larger tensors are subsampled evenly (the search is a 1-D fit)."""


@torch.no_grad()
def mse_step(x: Tensor, step: Tensor, quantize: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The step ``step * f`` (``f`` in :data:`STEP_SEARCH_FACTORS`) with the least mean squared error
    ``mean((quantize(x, s) - x)**2)``: the MSE calibration of post-training quantization, where no
    training moves a step set by the LSQ rule of thumb. ``quantize(x, s)`` is the quantizer's own grid.

    Returns:
        Detached tensor shaped like ``step``.
    """
    flat = x.detach().reshape(-1)
    if flat.numel() > STEP_SEARCH_ELEMENTS:
        flat = flat[:: flat.numel() // STEP_SEARCH_ELEMENTS + 1]
    base = step.detach().reshape(1)
    best, best_err = base, float("inf")
    for f in STEP_SEARCH_FACTORS:
        candidate = base * f
        err = float((quantize(flat, candidate) - flat).square().mean())
        if err < best_err:
            best, best_err = candidate, err
    return best.reshape(step.shape).clone()

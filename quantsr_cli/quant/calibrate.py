"""Calibration of a freshly quantized model: quantizer initialisation and empirical bias correction.

Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019, the *empirical* variant; also AIMET's default) is not part of the released
QuantSR/QuantSR+ code, which starts QAT from the uncorrected fake-quant model. We add it because the
RBD weight grid is asymmetric (``{−2**(n−1)+1 … 2**(n−1)}``, one extra positive level): on the
published IMDN x4 weights at W2 the saturated positive tails shift every output channel's mean, the
shifts compound through the LeakyReLU blocks, and the calibrated W2A2 model starts at 13.3 dB on
Set5 (mirrored grid: 28.4 dB). Subtracting each layer's mean output error from its FP bias, layer
by layer while the quantizers initialise, fixes that; it changes only the initial value of a
trainable FP parameter and where the steps start, never the quantizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantsr_cli.quant.layers import QConv2d, QLinear


def _fp_output(layer: QConv2d | QLinear, x: Tensor) -> Tensor:
    if isinstance(layer, QConv2d):
        return layer._conv_forward(x, layer.weight, layer.bias)
    return F.linear(x, layer.weight, layer.bias)


def _channel_mean(t: Tensor, layer: QConv2d | QLinear) -> Tensor:
    """Mean over every dim but the output-channel dim (1 for conv, last for linear)."""
    if isinstance(layer, QConv2d):
        return t.mean(dim=(0, 2, 3))
    return t.reshape(-1, t.shape[-1]).mean(dim=0)


@torch.no_grad()
def initialize_quantizers(model: nn.Module, batch: Tensor) -> None:
    """One training-mode forward on ``batch`` so every lazily initialised quantizer sets its state
    (signedness, steps) from real data; the model is left in training mode.

    Args:
        model: a model after :func:`~quantsr_cli.quant.quantize_`.
        batch: ``(N, 3, h, w)`` LR images in [0, 1].
    """
    model.train()
    model(batch)


@torch.no_grad()
def correct_biases_(model: nn.Module, batch: Tensor) -> int:
    """Empirical bias correction of every quantized layer with a bias, in one forward pass.

    For each ``QConv2d``/``QLinear`` ``L`` in execution order, with ``x`` its actual input (already
    affected by the quantized, corrected layers before it): ``b_L -= mean(L(x) − L_fp(x))`` per output
    channel, where ``L_fp`` uses the unquantized input and weight. The layer's output is corrected
    in place before it flows on, so later layers see the corrected network. A layer called twice
    is corrected on its first call only.

    Run it on a model whose quantizers are **not yet initialised** (what ``quantsr quantize`` does):
    each lazily initialised quantizer then sets its step from the corrected upstream activations.
    Initialising first on the uncorrected network would size the activation steps for its drifted
    activations: on IMDN at RBD W2A2 the last layers' steps came out 6–7× too large (IMDB6.c5: 4.3
    instead of 0.78) and QAT spent hundreds of iterations shrinking them. The pass runs in the model's current mode
    (training mode for a calibration, as in :func:`initialize_quantizers`).

    Args:
        model: a quantized model.
        batch: ``(N, 3, h, w)`` LR images in [0, 1] (the calibration batch).

    Returns:
        The number of layers corrected.
    """
    done: set[int] = set()

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        if id(layer) in done or layer.bias is None:  # type: ignore[union-attr]
            return None
        done.add(id(layer))
        delta = _channel_mean(out - _fp_output(layer, inputs[0]), layer)  # type: ignore[arg-type]
        layer.bias.sub_(delta.to(layer.bias.dtype))  # type: ignore[union-attr]
        shape = (1, -1, 1, 1) if isinstance(layer, QConv2d) else (-1,)
        return out - delta.reshape(shape)

    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(batch)
    finally:
        for h in handles:
            h.remove()
    return len(done)


@torch.no_grad()
def calibrate_(model: nn.Module, batch: Tensor, bias_correction: bool = True, step_search: bool = False) -> None:
    """Calibrate a freshly quantized model on one batch, in training mode (left in training mode).

    With ``bias_correction`` this is a single :func:`correct_biases_` pass, so each quantizer
    initialises on its corrected input; otherwise it is :func:`initialize_quantizers` (the release).

    Args:
        model: a model after :func:`~quantsr_cli.quant.quantize_`, quantizers not yet initialised.
        batch: ``(N, 3, h, w)`` LR images in [0, 1].
        bias_correction: whether to correct the FP biases in the same pass.
        step_search: initialise learned steps (rbd, rlq, lsq) by a mean-squared-error search
            (:func:`~quantsr_cli.quant.primitives.mse_step`) instead of LSQ's rule of thumb, in the same
            pass: post-training quantization, where no training moves the steps afterwards.
    """
    with _step_search(model.modules(), step_search):
        if bias_correction:
            model.train()
            correct_biases_(model, batch)
        else:
            initialize_quantizers(model, batch)


@contextmanager
def _step_search(modules: Iterable[nn.Module], on: bool) -> Iterator[None]:
    """Set ``step_search`` on the learned-step quantizers among ``modules`` for the block (their class
    default afterwards)."""
    quantizers = [m for m in modules if hasattr(type(m), "step_search")]
    for q in quantizers:
        q.step_search = on
    try:
        yield
    finally:
        for q in quantizers:
            q.__dict__.pop("step_search", None)


def pending_quantizers(model: nn.Module) -> list[nn.Module]:
    """The quantizers of ``model`` not yet initialised (e.g. layers just added to a trained model)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "initialized", None), Tensor) and not bool(m.initialized)]


@torch.no_grad()
def initialize_pending_(model: nn.Module, batch: Tensor) -> int:
    """Initialise only the quantizers :func:`pending_quantizers` lists, by an MSE step search, in one
    eval-mode forward on ``batch`` (no bias correction; initialised quantizers and training-mode state
    such as PAMS's warm-up are left alone). Returns how many there were; the model is left in training mode.
    """
    pending = pending_quantizers(model)
    if not pending:
        return 0
    try:
        with _step_search(pending, True):
            model.eval()
            model(batch)
    finally:
        model.train()
    return len(pending)

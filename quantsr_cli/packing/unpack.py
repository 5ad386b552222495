"""Packed model -> trainable fake-quant (QAT) model, so a shipped packed file can be fine-tuned.

A packed file keeps what inference needs (integer codes, scales, activation steps, shifts, biases)
but not the training-only state: the latent float weights between grid points, the optimizer
moments and, for RBD, the learned per-bit scales ``s_i`` and thresholds ``β_i``. :func:`to_qat`
rebuilds a QAT model whose forward equals the packed model's:

* latent weight = dequantized weight ``scale · (codes − zero)``, i.e. exactly on the grid, so the
  first re-quantization reproduces the codes;
* weight step ``α`` = the stored scale; RBD's ``s_i = 1``, ``β_i = 0`` (its initial values, for
  which RBD is the uniform grid ``{−2**(n−1)+1 … 2**(n−1)}·α``, the same levels the codes index);
* activation step, signedness (from ``qmin``) and shift ``τ̂`` as stored.

Only the learned-step methods (``lsq``, ``rlq``, ``rbd``) can be rebuilt: DoReFa and PAMS derive
their weight grid from the float weight itself (``max|tanh W|``, ``max|W|``), which a packed file does
not determine. This is our addition; neither QuantSR nor QuantSR+ ship packed files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.packing.layout import rows_to_conv_weight
from quantsr_cli.packing.modules import PackedActQuant, PackedModule
from quantsr_cli.quant import quantize_

REBUILDABLE_METHODS = ("lsq", "rlq", "rbd")
"""Methods whose QAT state a packed file determines (see the module docstring)."""


def check_rebuildable(method: str, source: Path | str | None) -> None:
    """Raise ``ConfigError`` naming ``source`` unless a packed ``method`` file can be fine-tuned."""
    if method not in REBUILDABLE_METHODS:
        raise ConfigError(f"{source}: a packed {method} model cannot be fine-tuned (its weight grid comes from "
                          f"the float weights, which a packed file does not keep); use its qat_last/qat_best file")


def _qat_act_quantizer(module: nn.Module) -> nn.Module | None:
    """The learned-step activation quantizer inside a QAT layer or activation point (None if A32)."""
    act = getattr(module, "act_q", None)
    inner = getattr(act, "act_q", act)  # ActQuant wraps its quantizer
    return inner


@torch.no_grad()
def _copy_act(packed: PackedModule, qat: nn.Module, name: str, path: Path | str | None) -> None:
    quantizer = _qat_act_quantizer(qat)
    if packed.a_bits >= 32:
        if quantizer is not None:
            raise CheckpointError(f"layer {name}: stored without activation quantization, the model quantizes it", path)
        return
    if quantizer is None or not hasattr(quantizer, "signed"):
        raise CheckpointError(f"layer {name}: the model has no learned-step activation quantizer here", path)
    quantizer.signed.fill_(packed.a_qmin < 0)
    if (packed.a_qmin, packed.a_qmax) != quantizer.qrange:
        raise CheckpointError(f"layer {name}: activation code range [{packed.a_qmin}, {packed.a_qmax}] is not the "
                              f"{quantizer.bits}-bit signed or unsigned grid", path)
    quantizer.step.copy_(packed.a_step.reshape(quantizer.step.shape))
    if packed.a_shift is not None:
        if quantizer.shift is None or quantizer.shift.numel() != packed.a_shift.numel():
            raise CheckpointError(f"layer {name}: the stored shift does not fit the model's quantizer", path)
        quantizer.shift.copy_(packed.a_shift.reshape(quantizer.shift.shape))
    elif quantizer.shift is not None:
        quantizer.shift.zero_()
    quantizer.initialized.fill_(True)


@torch.no_grad()
def _copy_weight(packed: PackedModule, qat: nn.Module, name: str, path: Path | str | None) -> None:
    w_q = getattr(qat, "w_q", None)
    if w_q is None or not hasattr(w_q, "step"):
        raise CheckpointError(f"layer {name}: the model has no learned-step weight quantizer here", path)
    if packed.w_scale.numel() != 1:
        raise CheckpointError(f"layer {name}: per-channel weight scales cannot be rebuilt as a per-tensor quantizer", path)
    if abs(packed.w_zero - getattr(w_q, "zero", 2 ** (w_q.bits - 1))) > 0 or packed.w_bits != w_q.bits:
        raise CheckpointError(f"layer {name}: W{packed.w_bits} codes with zero {packed.w_zero:g} do not fit "
                              f"{w_q.method} W{w_q.bits}", path)
    qat.weight.copy_(packed.dequantized_weight().reshape(qat.weight.shape))
    if packed.bias is not None:
        qat.bias.copy_(packed.bias)
    w_q.step.copy_(packed.w_scale.reshape(w_q.step.shape))
    for pname, init in (("bit_scale", 1.0), ("bit_bias", 0.0)):
        if hasattr(w_q, pname):
            getattr(w_q, pname).fill_(init)
    w_q.initialized.fill_(True)
    if not torch.equal(w_q.export(qat.weight).codes.reshape(-1), _codes_in_weight_order(packed, qat.weight.shape).reshape(-1)):
        raise CheckpointError(f"layer {name}: the rebuilt quantizer does not reproduce the stored codes", path)


def _codes_in_weight_order(packed: PackedModule, shape: torch.Size) -> torch.Tensor:
    rows = packed.codes()
    return rows_to_conv_weight(rows, shape) if len(shape) == 4 else rows


def to_qat(packed_model: nn.Module, config: Any = None, path: Path | str | None = None) -> nn.Module:
    """A trainable QAT model (train mode) with the same forward as ``packed_model``.

    Args:
        packed_model: from :func:`quantsr_cli.packing.io.load_model_file` on a ``packed`` file.
        config: the file's ``QuantConfig`` (method in :data:`REBUILDABLE_METHODS`); default: the
            ``quant_config`` that ``load_model_file`` attaches from the file's metadata.
        path: the file, for error messages.

    Raises:
        ConfigError: a method whose QAT state a packed file does not determine.
        CheckpointError: a layer that does not fit the rebuilt quantizers.
    """
    config = config if config is not None else getattr(packed_model, "quant_config", None)
    if config is None:
        raise CheckpointError("packed model has no quantization config (method/bits metadata)", path)
    check_rebuildable(config.method, path)
    model = build_model(packed_model.arch, **packed_model.hparams)
    quantize_(model, config)
    packed_modules = {n: m for n, m in packed_model.named_modules() if isinstance(m, PackedModule)}
    own = {k: v for k, v in packed_model.state_dict().items()
           if not any(k.startswith(n + ".") for n in packed_modules)}
    result = model.load_state_dict(own, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(n + ".") for n in packed_modules)]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"tensors do not fit a {packed_model.arch} model: "
                              f"{', '.join((missing + result.unexpected_keys)[:5])}", path)
    qat_modules = dict(model.named_modules())
    for name, packed in packed_modules.items():
        qat = qat_modules.get(name)
        if qat is None:
            raise CheckpointError(f"layer {name} is not in a {packed_model.arch} model", path)
        if not isinstance(packed, PackedActQuant):
            _copy_weight(packed, qat, name, path)
        _copy_act(packed, qat, name, path)
    for name in model.block_names() if callable(getattr(model, "block_names", None)) else []:
        model.get_submodule(name).skip = getattr(packed_model.get_submodule(name), "skip", False)
    return model.train()

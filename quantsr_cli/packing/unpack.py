"""Packed model -> trainable fake-quant (QAT) model, so a shipped packed file can be fine-tuned.

A packed file keeps what inference needs (integer codes, scales, activation steps, shifts, biases)
but not the training-only state: the latent float weights between grid points, the optimizer
moments and, for RBD, the learned per-bit scales ``s_i`` and thresholds ``β_i``. :func:`to_qat`
rebuilds a QAT model whose forward equals the packed model's:

* latent weight = dequantized weight ``scale · (codes − zero)``, i.e. exactly on the grid, so the
  first re-quantization reproduces the codes;
* every quantizer's state from the stored parameters, through its own ``load_packed`` (weight step =
  the stored scale; for RBD also ``s_i = 1``, ``β_i = 0``; activation step, signedness and shift).

Only methods whose :class:`~quantsr_cli.quant.methods.MethodSpec` is ``fine_tunable`` can be rebuilt:
others derive their weight grid from the float weight itself, which a packed file does not determine.
This is our addition; neither QuantSR nor QuantSR+ ship packed files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import CheckpointError, ConfigError, QuantSRError
from quantsr_cli.models import build_model
from quantsr_cli.packing.layout import rows_to_conv_weight
from quantsr_cli.packing.modules import PackedActQuant, PackedModule
from quantsr_cli.quant import ActParams, method_names, method_spec, quantize_


def check_rebuildable(method: str, source: Path | str | None) -> None:
    """Raise ``ConfigError`` naming ``source`` unless a packed ``method`` file can be fine-tuned."""
    if not method_spec(method).fine_tunable:
        raise ConfigError(f"{source}: a packed {method} model cannot be fine-tuned (its weight grid comes from "
                          f"the float weights, which a packed file does not keep; packed files of "
                          f"{', '.join(method_names(fine_tunable=True))} can be); use its qat_last/qat_best file")


def _qat_act_quantizer(module: nn.Module) -> nn.Module | None:
    """The activation quantizer inside a QAT layer or activation point (None if A32)."""
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
    if quantizer is None or quantizer.bits != packed.a_bits:
        raise CheckpointError(f"layer {name}: stored with A{packed.a_bits}, the model has "
                              f"{'no activation quantizer' if quantizer is None else f'A{quantizer.bits}'} here", path)
    shift = None if packed.a_shift is None else packed.a_shift.detach().clone()
    params = ActParams(packed.a_bits, packed.a_step.detach().clone(), packed.a_qmin, packed.a_qmax, shift)
    try:
        quantizer.load_packed(params)
    except QuantSRError as exc:
        raise CheckpointError(f"layer {name}: {exc}", path) from None


@torch.no_grad()
def _copy_weight(packed: PackedModule, qat: nn.Module, name: str, path: Path | str | None) -> None:
    w_q = getattr(qat, "w_q", None)
    if w_q is None or packed.w_bits != w_q.bits:
        raise CheckpointError(f"layer {name}: W{packed.w_bits} codes do not fit the model's "
                              f"{'full-precision weight' if w_q is None else f'{w_q.method} W{w_q.bits} quantizer'}",
                              path)
    try:
        w_q.load_packed(packed.w_scale.detach().clone(), packed.w_zero)
    except QuantSRError as exc:
        raise CheckpointError(f"layer {name}: W{packed.w_bits} {exc}", path) from None
    qat.weight.copy_(packed.dequantized_weight().reshape(qat.weight.shape))
    if packed.bias is not None:
        qat.bias.copy_(packed.bias)
    if not torch.equal(w_q.export(qat.weight).codes.reshape(-1), _codes_in_weight_order(packed, qat.weight.shape).reshape(-1)):
        raise CheckpointError(f"layer {name}: the rebuilt quantizer does not reproduce the stored codes", path)


def _codes_in_weight_order(packed: PackedModule, shape: torch.Size) -> torch.Tensor:
    rows = packed.codes()
    return rows_to_conv_weight(rows, shape) if len(shape) == 4 else rows


def to_qat(packed_model: nn.Module, config: Any = None, path: Path | str | None = None) -> nn.Module:
    """A trainable QAT model (train mode) with the same forward as ``packed_model``.

    Args:
        packed_model: from :func:`quantsr_cli.packing.io.load_model_file` on a ``packed`` file.
        config: the file's ``QuantConfig`` (a ``fine_tunable`` method); default: the
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

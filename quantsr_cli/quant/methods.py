"""The quantization method registry: one :class:`MethodSpec` per method, the only list of methods.

A method is a pair of quantizer classes (:class:`~quantsr_cli.quant.base.ActQuantizer`,
:class:`~quantsr_cli.quant.base.WeightQuantizer`) plus what the rest of quantsr needs to know about them.
Everything else (``QuantConfig`` validation at use, the ``--method`` help, ``quantsr info``, packing,
fine-tuning packed files) reads :data:`METHODS`; no other module names a method.

To add a method: write its two quantizer classes in one new file (``quant/<name>.py``: ``forward``,
``export``, and ``create``/``load_packed`` where they apply; the contract is in ``quant/base.py`` and
DEVELOPERS.md), then add one :class:`MethodSpec` line to :data:`METHODS` below.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantsr_cli.errors import ConfigError
from quantsr_cli.quant.act import (
    DoReFaActQuantizer,
    LSQActQuantizer,
    PAMSActQuantizer,
    RBDActQuantizer,
    RLQActQuantizer,
)
from quantsr_cli.quant.base import ActQuantizer, WeightQuantizer
from quantsr_cli.quant.weight import (
    DoReFaWeightQuantizer,
    LSQWeightQuantizer,
    PAMSWeightQuantizer,
    RBDWeightQuantizer,
    RLQWeightQuantizer,
)

FULL_PRECISION_BITS = 32
"""A bit-width that means "not quantized": no quantizer is built."""


@dataclass(frozen=True)
class MethodSpec:
    """One registered quantization method.

    Attributes:
        name: the ``QuantConfig.method`` / ``--method`` value, also stored in model files.
        act: activation quantizer class; built with ``act.create(bits, shift_shape, sign_rule)``.
        weight: weight quantizer class; built with ``weight(bits)``.
        fine_tunable: whether a packed file of this method determines its QAT state, so
            ``quantize --model PACKED`` can fine-tune it (``packing.unpack.to_qat``). Then both classes
            implement ``load_packed``. Methods whose grid depends on the float weight itself (DoReFa's
            ``max|tanh W|``, PAMS's ``max|W|``) cannot be.
        summary: one line for help texts.

    Packed parameters are exported by the quantizers themselves: ``weight.export(W) -> WeightParams``
    (codes, scale, zero) and ``act.export() -> ActParams`` (bits, step, qmin, qmax, shift), both
    reproducing the fake-quant forward exactly; ``load_packed`` is their inverse.
    """

    name: str
    act: type[ActQuantizer]
    weight: type[WeightQuantizer]
    fine_tunable: bool
    summary: str

    def make_act(self, bits: int, shift_shape: tuple[int, ...] | None = None,
                 sign_rule: str = "min") -> ActQuantizer | None:
        """The activation quantizer at ``bits`` (``None`` for 32 bits)."""
        return None if bits == FULL_PRECISION_BITS else self.act.create(bits, shift_shape, sign_rule)

    def make_weight(self, bits: int) -> WeightQuantizer | None:
        """The weight quantizer at ``bits`` (``None`` for 32 bits)."""
        return None if bits == FULL_PRECISION_BITS else self.weight(bits)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("rbd", RBDActQuantizer, RBDWeightQuantizer, True, "QuantSR+ redistribution-driven bit determination"),
    MethodSpec("rlq", RLQActQuantizer, RLQWeightQuantizer, True, "QuantSR learnable quantizer with tanh rounding"),
    MethodSpec("lsq", LSQActQuantizer, LSQWeightQuantizer, True, "LSQ learned step size (Esser et al. 2020)"),
    MethodSpec("dorefa", DoReFaActQuantizer, DoReFaWeightQuantizer, False, "DoReFa-Net as released with QuantSR+"),
    MethodSpec("pams", PAMSActQuantizer, PAMSWeightQuantizer, False, "PAMS learnable clip (Li et al. 2020)"),
)}
"""Registered methods by name; the first is the default (``QuantConfig().method``, checked by a test)."""


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the registered ones).
    """
    spec = METHODS.get(name)
    if spec is None:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return spec


def method_names(fine_tunable: bool | None = None) -> list[str]:
    """Registered method names, optionally only those whose packed files can (or cannot) be fine-tuned."""
    return [n for n, s in METHODS.items() if fine_tunable is None or s.fine_tunable == fine_tunable]

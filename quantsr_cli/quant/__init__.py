"""Quantization-aware training: quantizers, QAT modules and the one entry point :func:`quantize_`.

Methods (``QuantConfig.method``) are registered in :data:`METHODS` (:mod:`quantsr_cli.quant.methods`):
QuantSR+ RBD (the default), QuantSR RLQ and the LSQ, DoReFa and PAMS baselines; each is a
:class:`MethodSpec` naming its activation and weight quantizer classes.

Typical use::

    quantize_(model, QuantConfig(w_bits=4, a_bits=4))   # the default method; uses model.quant_patterns
    calibrate_(model, lr_batch)                          # init quantizers + bias correction, one pass
    opt = torch.optim.Adam(param_groups(model, lr=2e-4))

Export for packing: ``layer.w_q.export(layer.weight)`` → :class:`WeightParams`, ``layer.act_q.export()``
→ :class:`ActParams` (see ``DEVELOPERS.md``).
"""

from quantsr_cli.quant.act import (
    DoReFaActQuantizer,
    LearnedStepActQuantizer,
    LSQActQuantizer,
    PAMSActQuantizer,
    RBDActQuantizer,
    RLQActQuantizer,
)
from quantsr_cli.quant.api import (
    add_layers_,
    layer_plan,
    param_groups,
    quant_summary,
    quantize_,
    quantized_layers,
    quantizer_parameters,
)
from quantsr_cli.quant.base import ActParams, ActQuantizer, WeightParams, WeightQuantizer, apply_act_params
from quantsr_cli.quant.calibrate import (calibrate_, correct_biases_, initialize_pending_, initialize_quantizers,
                                        pending_quantizers)
from quantsr_cli.quant.layers import ActQuant, QConv2d, QLinear, make_act_quantizer, make_weight_quantizer
from quantsr_cli.quant.methods import METHODS, MethodSpec, method_names, method_spec
from quantsr_cli.quant.weight import (
    DoReFaWeightQuantizer,
    LSQWeightQuantizer,
    PAMSWeightQuantizer,
    RBDWeightQuantizer,
    RLQWeightQuantizer,
)

__all__ = [
    "ActParams",
    "ActQuant",
    "ActQuantizer",
    "DoReFaActQuantizer",
    "DoReFaWeightQuantizer",
    "LSQActQuantizer",
    "LSQWeightQuantizer",
    "LearnedStepActQuantizer",
    "METHODS",
    "MethodSpec",
    "PAMSActQuantizer",
    "PAMSWeightQuantizer",
    "QConv2d",
    "QLinear",
    "RBDActQuantizer",
    "RBDWeightQuantizer",
    "RLQActQuantizer",
    "RLQWeightQuantizer",
    "WeightParams",
    "WeightQuantizer",
    "add_layers_",
    "apply_act_params",
    "calibrate_",
    "correct_biases_",
    "initialize_pending_",
    "initialize_quantizers",
    "layer_plan",
    "make_act_quantizer",
    "make_weight_quantizer",
    "method_names",
    "method_spec",
    "param_groups",
    "pending_quantizers",
    "quant_summary",
    "quantize_",
    "quantized_layers",
    "quantizer_parameters",
]

"""Model-level quantization for the diffusion engine: swap layers, calibrate, partition, freeze.

Works on any ``nn.Module`` that exposes the plain data of the one-step SR contract
(:mod:`quantsr_cli.diffusion` docstring): ``quant_patterns`` (``fnmatch`` patterns over
``named_modules()``; matching ``nn.Conv2d``/``nn.Linear`` become :class:`QuantConv2d`/:class:`QuantLinear`,
matching ``nn.Identity`` become :class:`ActPoint`), ``keep_patterns`` (layers held at ``keep_bits``, default
8, as PassionSR keeps its first/last layers) and ``rpq_modules()`` (the ordered module chain).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatch

import torch
from torch import nn

from quantsr_cli.diffusion.qlayers import QUANT_LAYER_TYPES, ActPoint, QuantConv2d, QuantLinear
from quantsr_cli.diffusion.quantizers import QUANTIZERS
from quantsr_cli.errors import ConfigError


@dataclass(frozen=True)
class QuantSpec:
    """Bits and finetuning components of a quantized one-step model.

    Args:
        w_bits, a_bits: bits of the quantized layers (2, 4 or 8; 32 = leave unquantized).
        quantizer: ``"lbq"`` (learnable boundaries, QArtSR/PassionSR) or ``"lsq"`` (LSQ/LSQ+ step).
        smooth: per-channel smoothing factor phi; ``smooth_alpha`` its init exponent (0.3).
        lowrank: rank of the 16-bit SVD branch (0 = off); lora: LoRA rank (0 = off).
        act_init: ``"ema"`` (EMA of batch min/max, momentum 0.95) or ``"minmax"`` (absolute).
        keep_bits: bits of the keep-list layers (first/last convs, time embedding).
        keep_patterns: override of the model's ``keep_patterns`` (``None`` = use the model's).
        attention: quantize the attention activation points (q, k, v, softmax output).
    """

    w_bits: int = 4
    a_bits: int = 4
    quantizer: str = "lbq"
    smooth: bool = True
    smooth_alpha: float = 0.3
    lowrank: int = 4
    lora: int = 4
    act_init: str = "ema"
    keep_bits: int = 8
    keep_patterns: tuple[str, ...] | None = None
    attention: bool = True

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "keep_bits"):
            if getattr(self, name) not in (2, 3, 4, 6, 8, 32):
                raise ConfigError(f"{name}={getattr(self, name)} is not supported (2, 3, 4, 6, 8 or 32)")
        if self.quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer={self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if self.act_init not in ("ema", "minmax"):
            raise ConfigError(f"act_init={self.act_init!r}; choose ema or minmax")
        if not (0 <= self.lowrank <= 1024 and 0 <= self.lora <= 1024):
            raise ConfigError("lowrank and lora ranks must be between 0 and 1024")

    @classmethod
    def minmax_ptq(cls, w_bits: int, a_bits: int) -> QuantSpec:
        """Plain min-max PTQ: no smoothing, no low-rank branch, no LoRA."""
        return cls(w_bits=w_bits, a_bits=a_bits, smooth=False, lowrank=0, lora=0, act_init="minmax")

    def layer_options(self, keep: bool) -> QuantSpec:
        """What one layer is built with: this spec, or for a keep-list layer ``keep_bits`` and no
        smoothing, low-rank branch or LoRA."""
        if keep:
            return replace(self, w_bits=self.keep_bits, a_bits=self.keep_bits, smooth=False, lowrank=0, lora=0)
        return self

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["keep_patterns"] = None if self.keep_patterns is None else list(self.keep_patterns)
        return d


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """``model.set_submodule(name, new)``, which torch 2.4 (our minimum) does not have yet."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, spec: QuantSpec, patterns: Sequence[str] | None = None) -> dict[str, nn.Module]:
    """Replace, in place, the layers matched by ``model.quant_patterns`` with fake-quantized wrappers.

    Wrappers start *disabled* (they compute the FP result) until :func:`set_quant_enabled`; call
    :func:`calibrate` before enabling them. Every original parameter gets ``requires_grad=False``.

    Returns:
        ``{module name: wrapper}`` in ``named_modules()`` order.
    """
    patterns = tuple(patterns if patterns is not None else getattr(model, "quant_patterns", ("*",)))
    keep = tuple(spec.keep_patterns if spec.keep_patterns is not None else getattr(model, "keep_patterns", ()))
    model.requires_grad_(False)
    targets = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, QUANT_LAYER_TYPES) or not _match(name, patterns):
            continue
        if type(mod) in (nn.Conv2d, nn.Linear) or (type(mod) is nn.Identity and spec.attention):
            targets.append((name, mod))
    if not targets:
        raise ConfigError("no layer matches the model's quant_patterns")
    device = next(model.parameters()).device
    for name, mod in targets:
        opts = spec.layer_options(_match(name, keep))
        if isinstance(mod, nn.Conv2d):
            new: nn.Module = QuantConv2d.from_float(mod, opts)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, opts)
        else:
            new = ActPoint(opts).to(device)
        _set_submodule(model, name, new)
    for p in finetune_parameters(model):
        p.requires_grad_(True)
    return quant_layers(model)


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: wrapper}`` of every quantized layer and activation point, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def finetune_parameters(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[nn.Parameter]:
    """The quantization-finetuning parameters (phi, low-rank, LoRA, quantizers) of all wrappers,
    or only of the wrappers named in ``names``. The original weights are never among them."""
    layers = quant_layers(model)
    for n in (layers if names is None else names):
        yield from layers[n].finetune_parameters()


def set_quant_enabled(model: nn.Module, enabled: bool | Callable[[str], bool]) -> None:
    """Switch fake quantization on/off for all wrappers (``bool``) or per name (predicate).

    Wrappers whose quantizers were never initialised (not reached by calibration) stay off.
    """
    for name, layer in quant_layers(model).items():
        on = enabled(name) if callable(enabled) else bool(enabled)
        layer.quant_enabled = on and layer.ready


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], momentum: float = 0.95,
              forward: Callable[[nn.Module, torch.Tensor], object] | None = None) -> int:
    """Observe FP activations on ``batches`` and initialise phi, the SVD branch and the quantizers.

    Quantization is disabled during the pass (PassionSR's FP-statistics initialisation) and left
    disabled afterwards. ``forward(model, x)`` defaults to ``model(x)``.

    Returns:
        the number of batches seen.
    """
    layers = quant_layers(model)
    set_quant_enabled(model, False)
    for layer in layers.values():
        layer.start_observing(momentum)
    n = 0
    for x in batches:
        (forward or (lambda m, t: m(t)))(model, x)
        n += 1
    if n == 0:
        raise ConfigError("calibration needs at least one batch")
    for layer in layers.values():
        if layer.observer is not None and layer.observer.ready:
            layer.init_quantization()
        else:  # layer not reached by the forward pass: leave it unquantized
            layer.observer = None
    return n


def assign_modules(model: nn.Module, chain: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Map every quantized layer to one element of the ordered module chain.

    Args:
        chain: module names (or tuples of names forming one group) in forward-execution order.

    Returns:
        per chain element, the names of the wrappers under it.

    Raises:
        ConfigError: a wrapper lies under no element or under two of them.
    """
    groups = [(c,) if isinstance(c, str) else tuple(c) for c in chain]
    owned: list[list[str]] = [[] for _ in groups]
    for name in quant_layers(model):
        hits = [i for i, g in enumerate(groups) if any(name == p or name.startswith(p + ".") for p in g)]
        if len(hits) != 1:
            where = "no module" if not hits else f"modules {hits}"
            raise ConfigError(f"quantized layer {name} belongs to {where} of the RPQ chain")
        owned[hits[0]].append(name)
    return owned


def snapshot_original(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every state tensor of the model (call it on the FP model, before quantizing)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed_originals(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``snapshot`` whose tensor in ``model`` is missing or differs bitwise (empty = intact).

    Wrappers keep the FP key names (``weight``/``bias``), so a snapshot of the FP model can be
    compared with the quantized model after any amount of calibration.
    """
    state = model.state_dict()
    return [k for k, v in snapshot.items() if k not in state or not torch.equal(state[k], v)]


def dequantize_model(model: nn.Module, merge_lora: bool = True) -> nn.Module:
    """A deep copy with every wrapper turned back into a plain FP layer (``nn.Identity`` for points).

    With ``merge_lora`` the LoRA delta is added into the copied weight (TRQ's retrained model);
    the input ``model`` is not modified.
    """
    out = copy.deepcopy(model)
    for name, layer in list(quant_layers(out).items()):
        if isinstance(layer, ActPoint):
            _set_submodule(out, name, nn.Identity())
            continue
        weight = layer.merged_weight() if merge_lora else layer.weight
        if isinstance(layer, QuantConv2d):
            plain: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                                         layer.padding_mode, device="meta")
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(weight.detach().clone())
        plain.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        plain.train(layer.training)
        _set_submodule(out, name, plain)
    out.requires_grad_(False)
    return out


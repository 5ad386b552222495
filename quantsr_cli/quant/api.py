"""The one entry point :func:`quantize_` and helpers over quantized models.

``quantize_`` works from the plain data a model exposes (``model.quant_patterns``: ``fnmatch``
patterns over ``named_modules()`` names) and never imports :mod:`quantsr_cli.models`.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase

import torch
from torch import nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import ConfigError
from quantsr_cli.quant.base import ActQuantizer, WeightQuantizer
from quantsr_cli.quant.layers import ActQuant, QConv2d, QLinear
from quantsr_cli.quant.methods import method_spec

_QUANTIZABLE = (nn.Conv2d, nn.Linear, nn.Identity)
_QUANTIZED = (QConv2d, QLinear, ActQuant)
_GLOB = frozenset("*?[")


def _matches(modules: dict[str, nn.Module], pattern: str) -> list[str]:
    """Names in ``modules`` that ``pattern`` matches (a pattern without wildcards is looked up directly)."""
    if not _GLOB & set(pattern):
        return [pattern] if pattern in modules else []
    return [name for name in modules if fnmatchcase(name, pattern)]


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def layer_plan(model: nn.Module, config: QuantConfig,
               patterns: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
    """The modules :func:`quantize_` swaps and their ``(w_bits, a_bits)`` (architecture patterns' order, then rules').

    The architecture's layers (``patterns``, default ``model.quant_patterns``: ``nn.Conv2d``/``nn.Linear``
    layers and ``nn.Identity`` activation points) take the config's bits; then ``config.layers`` rules
    (last match wins) change a matched layer's bits, keep it full precision (``fp``), or quantize a
    Conv2d/Linear the architecture keeps full precision. Rules reach activation points only where the
    architecture declares them. Layers a model lists in ``model.unquantizable`` (``{name: reason}``, e.g.
    a layer whose weights its network reads outside the layer's own forward) are never quantized; a rule
    that matches only such layers is an error naming the reason. ``(32, 32)`` layers are left out.

    Raises:
        ConfigError: no patterns, an architecture pattern or a rule that matches no layer.
    """
    pats = patterns if patterns is not None else getattr(model, "quant_patterns", None)
    if isinstance(pats, str):
        pats = (pats,)
    if not pats and not config.layers:
        raise ConfigError(f"{type(model).__name__} has no quant_patterns: nothing to quantize")
    modules = _candidates(model)
    layers = {name: m for name, m in modules.items() if m is not nn.Identity}
    chosen: dict[str, tuple[int, int]] = {}
    for pattern in pats or ():
        hits = _matches(modules, pattern)
        if not hits:
            raise ConfigError(f"quant pattern {pattern!r} matches no Conv2d, Linear or Identity module")
        chosen.update((name, (config.w_bits, config.a_bits)) for name in hits)
    identities = {name: m for name, m in modules.items() if m is nn.Identity}
    points = {name for name in chosen if modules[name] is nn.Identity}
    points.update(n for p in getattr(model, "act_points", None) or () for n in _matches(identities, p))
    blocked: dict[str, str] = dict(getattr(model, "unquantizable", None) or {})
    for pattern, w, a in config.layers:
        hits = [n for n in _matches(modules, pattern) if n in layers or n in points]
        usable = [n for n in hits if n not in blocked]
        if not usable:
            why = f"; {hits[0]} cannot be quantized ({blocked[hits[0]]})" if hits else ""
            raise ConfigError(f"layers: pattern {pattern!r} matches no quantizable Conv2d, Linear or activation "
                              f"point{why} (quantsr info --layers lists the layer names)")
        for name in usable:
            chosen[name] = (w, a)
    return {name: bits for name, bits in chosen.items() if bits != (32, 32) and name not in blocked}


def quantize_(model: nn.Module, config: QuantConfig, patterns: tuple[str, ...] | None = None) -> nn.Module:
    """Swap, in place, the modules :func:`layer_plan` selects for their quantized versions.

    Matching (``fnmatch.fnmatchcase`` over ``named_modules()`` names; ``*`` also spans dots):
    ``nn.Conv2d`` → :class:`QConv2d`, ``nn.Linear`` → :class:`QLinear` (weights reused, not
    copied), ``nn.Identity`` → :class:`ActQuant`, each at its own bits (``config.bits_for``: the
    config's, or a matching ``config.layers`` rule's). Modules of other types that a pattern matches
    are ignored. At ``a_bits == 32`` activation points stay ``nn.Identity`` and layers get
    ``act_q = None``; at ``w_bits == 32`` layers get ``w_q = None``.

    Args:
        model: any ``nn.Module``; modified in place.
        config: method, bit-widths and per-layer rules. ``config.full_precision`` returns ``model`` unchanged.
        patterns: overrides ``model.quant_patterns``.

    Returns:
        ``model`` itself, with ``model.quant_config = config`` (what packing writes into a file's
        metadata: the one record of the method and bits of a quantized model).

    Raises:
        ConfigError: an unknown method, no patterns, a pattern or rule that matches no quantizable
            module (see :func:`layer_plan`), or a model that is already quantized.
    """
    if config.full_precision:
        return model
    method_spec(config.method)
    if quantized_layers(model):
        raise ConfigError(f"{type(model).__name__} is already quantized")
    _swap(model, config, layer_plan(model, config, patterns))
    model.quant_config = config
    return model


def _candidates(model: nn.Module) -> dict[str, type]:
    """``{name: nn.Conv2d | nn.Linear | nn.Identity}`` of the modules a plan may select, already quantized
    ones under the type they replaced."""
    out: dict[str, type] = {}
    for name, m in model.named_modules():
        if not name:
            continue
        if type(m) in _QUANTIZABLE:
            out[name] = type(m)
        elif isinstance(m, _QUANTIZED):
            out[name] = {QConv2d: nn.Conv2d, QLinear: nn.Linear, ActQuant: nn.Identity}[type(m)]
    return out


def add_layers_(model: nn.Module, config: QuantConfig) -> list[str]:
    """Quantize, in place, the layers ``config`` adds to an already quantized ``model``; returns their names.

    ``config``'s plan (:func:`layer_plan`) must keep every layer ``model`` quantizes at its bits; the layers
    it selects that ``model`` leaves full precision are swapped as :func:`quantize_` does (their quantizers
    initialise on their first batch). Sets ``model.quant_config = config``.

    Raises:
        ConfigError: the plan drops a quantized layer or changes its bits, or ``model`` is not quantized.
    """
    current = quantized_layers(model)
    if not current:
        raise ConfigError(f"{type(model).__name__} is not quantized: use quantize_")
    plan = layer_plan(model, config)
    for name, module in current.items():
        bits = (getattr(module, "w_bits", None), module.a_bits)
        wanted = plan.get(name)
        if wanted is None or (wanted[1] != bits[1] or bits[0] is not None and wanted[0] != bits[0]):
            now = f"a{bits[1]}" if bits[0] is None else f"w{bits[0]}a{bits[1]}"
            then = "full precision" if wanted is None else f"w{wanted[0]}a{wanted[1]}"
            raise ConfigError(f"layers: {name} is {now} in the model being continued; the rules make it {then} "
                              "(a continued model can only gain quantized layers)")
    added = _swap(model, config, {name: bits for name, bits in plan.items() if name not in current})
    model.quant_config = config
    return added


def _swap(model: nn.Module, config: QuantConfig, plan: dict[str, tuple[int, int]]) -> list[str]:
    """Replace the modules ``plan`` names by their quantized versions; returns the names replaced
    (activation points at 32 bits stay ``nn.Identity``)."""
    device = _model_device(model)
    swapped = []
    for name, (w_bits, a_bits) in plan.items():
        module = model.get_submodule(name)
        layer_config = replace(config, w_bits=w_bits, a_bits=a_bits, layers=())
        new: nn.Module
        if isinstance(module, nn.Conv2d):
            new = QConv2d.from_float(module, layer_config)
        elif isinstance(module, nn.Linear):
            new = QLinear.from_float(module, layer_config)
        elif a_bits == 32:
            continue
        else:
            new = ActQuant(layer_config).to(device)
            new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append(name)
    return swapped


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every :class:`QConv2d`, :class:`QLinear` and :class:`ActQuant`, in
    ``named_modules()`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _QUANTIZED)}


def quant_summary(model: nn.Module) -> dict[str, object]:
    """JSON-serialisable description of the quantized layers, for checkpoint metadata.

    Returns:
        ``{"num_layers": int, "methods": [str], "layers": {name: {"kind": "conv"|"linear"|"act",
        "method": str, "w_bits": int | None, "a_bits": int}}}`` (``w_bits`` is ``None`` for
        activation points; 32 means that part is full precision).
    """
    layers: dict[str, dict[str, object]] = {}
    for name, m in quantized_layers(model).items():
        if isinstance(m, ActQuant):
            layers[name] = {"kind": "act", "method": m.method, "w_bits": None, "a_bits": m.a_bits}
        else:
            kind = "conv" if isinstance(m, QConv2d) else "linear"
            layers[name] = {"kind": kind, "method": m.method, "w_bits": m.w_bits, "a_bits": m.a_bits}
    methods = sorted({str(v["method"]) for v in layers.values()})
    return {"num_layers": len(layers), "methods": methods, "layers": layers}


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable quantizer parameters: steps, shifts ``τ̂``, RBD bit scales/thresholds, PAMS clips."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, (ActQuantizer, WeightQuantizer)):
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def param_groups(model: nn.Module, lr: float, quant_lr: float | None = None) -> list[dict[str, object]]:
    """Optimizer parameter groups: network weights at ``lr``, quantizer parameters at ``quant_lr``.

    Adam normalises away LSQ's gradient scale, so a step moves about ``lr`` per iteration whatever
    its size; ``quant_lr`` lets a caller slow or speed them (default: ``lr``). Quantizer parameters
    get ``weight_decay = 0``. Only parameters with ``requires_grad`` are included; empty groups
    are dropped.

    Returns:
        A list for ``torch.optim.Adam(groups, ...)``; each group has ``params``, ``lr`` and ``name``
        (``"weights"`` or ``"quantizers"``).
    """
    qids = {id(p) for p in quantizer_parameters(model)}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qids]
    quant = [p for p in model.parameters() if p.requires_grad and id(p) in qids]
    groups: list[dict[str, object]] = []
    if weights:
        groups.append({"params": weights, "lr": lr, "name": "weights"})
    if quant:
        qlr = lr if quant_lr is None else quant_lr
        groups.append({"params": quant, "lr": qlr, "weight_decay": 0.0, "name": "quantizers"})
    return groups

"""The generic quantization rule: which layers of an arbitrary SR network quantsr quantizes.

The papers' convention (QuantSR, QuantSR+, 2DQuant, PAMS): the first conv, the last layer and the
upsampler stay full precision; every other conv/linear is quantized. For a network quantsr did not
write (a spandrel architecture) these layers are found by running it, not by guessing from names:
:func:`trace_rule` runs the model once in eval mode and once in training mode on a small random LR
image (no gradients; RNG state and buffers restored) and watches every ``nn.Conv2d`` / ``nn.Linear``.

A plain ``nn.Conv2d`` / ``nn.Linear`` is **quantized** unless it is

* the first ``nn.Conv2d`` or the last ``nn.Conv2d``/``nn.Linear`` called (fixed layers such as EDSR's
  ``MeanShift`` before or after them do not count);
* part of the **upsampler**: its input is at a higher resolution than the body (the first conv's
  output), or its output goes straight into a pixel shuffle;
* a **channel-attention / squeeze** layer: its input is pooled to one pixel (one token), where
  quantization saves nothing and costs accuracy (IMDN's CCA, RCAN's CA, HAT's CAB).

Layers that **cannot** be quantized and packed (``unquantizable``; no per-layer rule can select them):
zero-sized layers, layers never called, layers called in only one of training/eval mode (re-parameterised blocks such as
SPAN's ``Conv3XC``), layers whose weights the network reads outside the layer's own forward (the packed
layer has no float weight), and convs with a ``padding_mode`` other than ``zeros``. Other parametric
modules (PReLU, LayerNorm, custom conv classes, attention position tables) always stay full precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["TraceResult", "trace_rule"]

CANDIDATES = (nn.Conv2d, nn.Linear)
"""Exactly these types are quantized (``quant.quantize_`` swaps plain Conv2d/Linear modules only)."""

_LAYER_LIKE = (nn.modules.conv._ConvNd, nn.Linear)
_WATCH = "_quantsr_watch"


@dataclass
class TraceResult:
    """What :func:`trace_rule` found.

    Attributes:
        quantized: names of the layers the rule quantizes, in call order.
        fp: ``{name: reason}`` of candidate layers the convention keeps full precision (first conv, last
            layer, upsampler, pooled channel attention); a per-layer rule may still quantize them.
        unquantizable: ``{name: reason}`` of layers that cannot be quantized at all.
        output_shape: the output shape of the eval-mode run (``(1, C, s*h, s*w)``).
    """

    quantized: list[str] = field(default_factory=list)
    fp: dict[str, str] = field(default_factory=dict)
    unquantizable: dict[str, str] = field(default_factory=dict)
    output_shape: tuple[int, ...] = ()


@dataclass
class _Watch:
    name: str
    depth: int = 0
    outside: bool = False


@dataclass
class _Run:
    calls: list[tuple[str, int, int, bool]] = field(default_factory=list)  # (name, input pixels, out id, conv?)
    outputs: list[Tensor] = field(default_factory=list)  # keeps output tensors alive (stable ids)
    shuffled: set[int] = field(default_factory=set)  # ids of tensors fed to a pixel shuffle
    output_shape: tuple[int, ...] = ()


@functools.cache
def _watched(cls: type) -> type:
    """A subclass of ``cls`` that records reads of ``weight``/``bias`` made outside the layer's forward."""

    def __getattr__(self: nn.Module, name: str) -> Any:
        if name in ("weight", "bias"):
            watch = self.__dict__.get(_WATCH)
            if watch is not None and watch.depth == 0:
                watch.outside = True
        return cls.__getattr__(self, name)

    return type(f"Watched{cls.__name__}", (cls,), {"__getattr__": __getattr__})


class _ShuffleSpy(TorchFunctionMode):
    """Records the ids of tensors passed to ``pixel_shuffle`` (functional or ``nn.PixelShuffle``)."""

    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in (torch.pixel_shuffle, torch.nn.functional.pixel_shuffle) and args:
            self.run.shuffled.add(id(args[0]))
        return func(*args, **(kwargs or {}))


def _spatial(module: nn.Module, x: Tensor, batch: int) -> int:
    """Pixels (conv) or tokens (linear) per image of an input of ``batch`` images."""
    if isinstance(module, nn.Linear):
        return x.numel() // max(int(x.shape[-1]) * batch, 1)
    return x.numel() // max(int(x.shape[0]) * int(x.shape[1]), 1) if x.dim() >= 3 else 1


def _trainable(module: nn.Module) -> bool:
    """False for fixed layers (all parameters frozen, e.g. EDSR/RCAN ``MeanShift``): not the first/last layer."""
    params = list(module.parameters(recurse=False))
    return not params or any(p.requires_grad for p in params)


def _run_once(model: nn.Module, x: Tensor, train: bool, watches: dict[str, _Watch]) -> _Run:
    run = _Run()
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, _LAYER_LIKE):
            continue

        def pre(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            watch = mod.__dict__.get(_WATCH)
            if watch is not None:
                watch.depth += 1
            if args and torch.is_tensor(args[0]) and _trainable(mod):
                run.calls.append((name, _spatial(mod, args[0], int(x.shape[0])), -1, not isinstance(mod, nn.Linear)))

        def post(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            watch = mod.__dict__.get(_WATCH)
            if watch is not None:
                watch.depth -= 1
            if torch.is_tensor(out) and run.calls and run.calls[-1][2] == -1 and _trainable(mod):
                name, spatial, _, conv = run.calls[-1]
                run.calls[-1] = (name, spatial, id(out), conv)
                run.outputs.append(out)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    model.train(train)
    try:
        with _ShuffleSpy(run):
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        run.output_shape = tuple(out.shape) if torch.is_tensor(out) else ()
    finally:
        for h in handles:
            h.remove()
        for watch in watches.values():
            watch.depth = 0
    return run


def trace_rule(model: nn.Module, x: Tensor) -> TraceResult:
    """Apply the generic rule (module docstring) to ``model`` by running it on ``x`` (``(2, 3, h, w)``: two
    images, so that batch norms run in training mode; 32 px, so that local pooling is not mistaken for
    global pooling).

    The model is left as it was: same classes, no hooks, its training flag, parameters and buffers
    unchanged, and the global RNG state restored.
    """
    was_training = model.training
    candidates = {n: m for n, m in model.named_modules() if n and type(m) in CANDIDATES}
    watches = {n: _Watch(n) for n in candidates}
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in candidates.items():
        module.__dict__[_WATCH] = watches[name]
        module.__class__ = _watched(type(module))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            runs = {mode: _run_once(model, x, mode, watches) for mode in (False, True)}
    finally:
        for name, module in candidates.items():
            module.__class__ = type(module).__mro__[1]
            module.__dict__.pop(_WATCH, None)
        model.train(was_training)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if key in saved and value.shape == saved[key].shape:
                    value.copy_(saved[key])
    return _classify(candidates, watches, runs[False], runs[True])


def _classify(candidates: dict[str, nn.Module], watches: dict[str, _Watch], ev: _Run, tr: _Run) -> TraceResult:
    result = TraceResult(output_shape=ev.output_shape)
    called_eval = {c[0] for c in ev.calls}
    called_train = {c[0] for c in tr.calls}
    first = next((c for c in ev.calls if c[3] and c[0] in candidates), None)
    body = _body_size(ev, first)
    last = next((c[0] for c in reversed(ev.calls) if c[0] in candidates), None)
    spatial: dict[str, int] = {}
    shuffled: set[str] = set()
    for name, pixels, out_id, _ in ev.calls:
        spatial[name] = max(spatial.get(name, 0), pixels)
        if out_id in ev.shuffled:
            shuffled.add(name)
    for name, module in candidates.items():
        reason = _unquantizable(module, name in called_eval, name in called_train, watches[name].outside)
        if reason:
            result.unquantizable[name] = reason
        elif not _trainable(module):
            result.fp[name] = "fixed weights (not trainable)"
        elif first is not None and name == first[0]:
            result.fp[name] = "first conv"
        elif name == last:
            result.fp[name] = "last layer"
        elif spatial[name] > body:
            result.fp[name] = "upsampler (runs above the body's resolution)"
        elif name in shuffled:
            result.fp[name] = "upsampler (feeds a pixel shuffle)"
        elif spatial[name] == 1 < body:
            result.fp[name] = "channel attention (pooled input)"
    order: dict[str, int] = {}
    for i, call in enumerate(ev.calls):
        order.setdefault(call[0], i)
    result.quantized = sorted((n for n in candidates if n not in result.fp and n not in result.unquantizable),
                              key=lambda n: order[n])
    return result


def _body_size(run: _Run, first: tuple[str, int, int, bool] | None) -> int:
    """Pixels of the body: the output of the first conv (its input when it has no tensor output)."""
    if first is None:
        return max((c[1] for c in run.calls), default=1)
    out = next((t for t in run.outputs if id(t) == first[2]), None)
    if out is not None and out.dim() == 4:
        return int(out.shape[-1]) * int(out.shape[-2])
    return first[1]


def _unquantizable(module: nn.Module, in_eval: bool, in_train: bool, outside: bool) -> str | None:
    if module.weight.numel() == 0:
        return "a zero-sized layer"
    if outside:
        return "its weights are read outside its own forward"
    if not in_eval and not in_train:
        return "never called by the forward"
    if in_eval != in_train:
        return f"called only in {'eval' if in_eval else 'training'} mode (re-parameterised)"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} cannot be packed"
    return None

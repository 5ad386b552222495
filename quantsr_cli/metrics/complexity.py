"""Parameter and MAC counting by forward hooks.

MACs (multiply-accumulates) counted per call of a module, summed over calls:

- ``nn.Conv2d`` (and subclasses such as quantized convs, other ``nn.ConvNd``, or any module with
  ``in_channels``, ``out_channels`` and ``kernel_size`` attributes, e.g. packed convs):
  ``numel(output) * in_channels / groups * kh * kw`` (transposed convs:
  ``numel(input) * out_channels / groups * kh * kw``);
- ``nn.Linear`` (and subclasses, or modules with ``in_features``/``out_features``):
  ``numel(output) * in_features``;
- attention matmuls, seen through *activation points* -- identity-like modules whose names match
  ``qk_points`` / ``av_points`` (default: the model's own ``qk_points`` / ``av_points`` attributes,
  which a model with attention declares; none otherwise):
  at a ``q`` point with input ``q`` of shape ``(B_, heads, N, head_dim)``, ``q @ k^T`` costs
  ``B_ * heads * N * N * head_dim = numel(q) * N``; at an ``attn`` point with input (softmax output)
  of shape ``(B_, heads, N, N)``, ``attn @ v`` costs ``numel(attn) * head_dim``, with ``head_dim``
  taken from the last ``q`` point of the same attention module (the same count as ``q @ k^T``).
  A ``q`` point called again before its attention module's ``attn`` point is ``v`` going through q's
  quantizer (SwinIR ``share_qv_quantizer``): that call is not a matmul and is not counted.

A model that declares no activation points (a foreign network, e.g. spandrel's SwinIR, HAT or DAT) gets
its attention matmuls counted from the tensor operations themselves: every ``matmul``/``bmm``/``@`` and
``scaled_dot_product_attention`` outside conv/linear layers, as ``numel(output) * K`` (under the name
``<matmul>``).

Bias additions, activations, normalisation, softmax and pixel-shuffle are not counted (the usual
convention of SR papers' "Multi-Adds"). Report MACs together with the input size.
"""

from __future__ import annotations

import fnmatch

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts.

    Args:
        model: any module.

    Returns:
        ``{"total": all parameters, "trainable": those with requires_grad, "conv_linear_weights":
        elements of Conv2d/Linear weight tensors (what a quantizer compresses), "buffers": buffer
        elements}``; shared parameters counted once.
    """
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    weights = 0
    seen_w: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) not in seen_w:
            seen_w.add(id(m.weight))
            weights += m.weight.numel()
    buffers = sum(b.numel() for b in model.buffers())
    return {"total": total, "trainable": trainable, "conv_linear_weights": weights, "buffers": buffers}


def _conv_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) or all(hasattr(m, a) for a in ("in_channels", "out_channels", "kernel_size"))


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or all(hasattr(m, a) for a in ("in_features", "out_features"))


def _kernel_elems(m: nn.Module) -> int:
    k = m.kernel_size
    if isinstance(k, int):
        return k * k
    n = 1
    for v in k:
        n *= int(v)
    return n


class _MatmulSpy(TorchFunctionMode):
    """Counts the MACs of matrix products (see the module docstring) through ``add(macs)``."""

    _MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
                torch.Tensor.bmm)

    def __init__(self, add: Callable[[int], None]) -> None:
        super().__init__()
        self.add = add

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self._MATMULS and len(args) == 2 and torch.is_tensor(out):
            a = args[1] if func is torch.Tensor.__rmatmul__ else args[0]
            self.add(out.numel() * int(a.shape[-1]) if a.dim() else 0)
        elif func is F.scaled_dot_product_attention and len(args) >= 3:
            q, k, v = args[:3]
            self.add(q.numel() * int(k.shape[-2]) + out.numel() * int(k.shape[-2]))
        return out


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 256, 256),
    qk_points: Sequence[str] | None = None,
    av_points: Sequence[str] | None = None,
    x: torch.Tensor | None = None,
) -> dict[str, object]:
    """Count multiply-accumulates of one forward pass (see the module docstring for the rules).

    The model runs once under ``torch.no_grad()`` in eval mode (its train/eval mode is restored), on
    zeros of ``input_shape`` placed on the model's device and dtype, or on ``x`` when given.

    Args:
        model: the network.
        input_shape: ``(N, C, H, W)`` of the input, e.g. the LR size (SR papers quote MACs for a
            given output size; convert yourself).
        qk_points: ``fnmatch`` patterns of module names whose input is ``q`` ``(B_, heads, N, head_dim)``
            (default: ``model.qk_points``, else none).
        av_points: ``fnmatch`` patterns of module names whose input is ``attn`` ``(B_, heads, N, N)``
            (default: ``model.av_points``, else none).
        x: explicit input tensor instead of zeros.

    Returns:
        ``{"total": int, "conv": int, "linear": int, "matmul": int, "layers": {module_name: int}}``;
        ``layers`` holds every counted module (attention points under their own names) in call order.
    """
    qk_points = tuple(getattr(model, "qk_points", ()) if qk_points is None else qk_points)
    av_points = tuple(getattr(model, "av_points", ()) if av_points is None else av_points)
    layers: dict[str, int] = {}
    kinds = {"conv": 0, "linear": 0, "matmul": 0}
    head_dim: dict[str, int] = {}
    pending_q: set[str] = set()  # attention modules whose q point ran since their last attn point
    handles = []

    def add(name: str, kind: str, macs: int) -> None:
        layers[name] = layers.get(name, 0) + int(macs)
        kinds[kind] += int(macs)

    def parent(name: str) -> str:
        return name.rsplit(".", 1)[0] if "." in name else ""

    names = [n for n, _ in model.named_modules()]
    with_av = {parent(n) for n in names if any(fnmatch.fnmatchcase(n, p) for p in av_points)}
    for name, m in model.named_modules():
        if any(fnmatch.fnmatchcase(name, p) for p in qk_points):
            def qk_hook(mod, inp, out, name=name):
                q, owner = inp[0], parent(name)
                if owner in pending_q:
                    return  # v through a shared q/v quantizer
                if owner in with_av:
                    pending_q.add(owner)
                head_dim[owner] = int(q.shape[-1])
                add(name, "matmul", q.numel() * q.shape[-2])

            handles.append(m.register_forward_hook(qk_hook))
        elif any(fnmatch.fnmatchcase(name, p) for p in av_points):
            def av_hook(mod, inp, out, name=name):
                attn = inp[0]
                pending_q.discard(parent(name))
                d = head_dim.get(parent(name))
                if d is None:
                    raise ValueError(f"{name}: no q activation point ({', '.join(qk_points)}) ran before it")
                add(name, "matmul", attn.numel() * d)

            handles.append(m.register_forward_hook(av_hook))
        elif _conv_like(m) and not list(m.children()):
            def conv_hook(mod, inp, out, name=name):
                groups = int(getattr(mod, "groups", 1))
                if isinstance(mod, nn.modules.conv._ConvTransposeNd):  # every input pixel scatters a kernel
                    add(name, "conv", inp[0].numel() * (int(mod.out_channels) // groups) * _kernel_elems(mod))
                else:
                    add(name, "conv", out.numel() * (int(mod.in_channels) // groups) * _kernel_elems(mod))

            handles.append(m.register_forward_hook(conv_hook))
        elif _linear_like(m) and not list(m.children()):
            def linear_hook(mod, inp, out, name=name):
                add(name, "linear", out.numel() * int(mod.in_features))

            handles.append(m.register_forward_hook(linear_hook))

    spy = _MatmulSpy(lambda macs: add("<matmul>", "matmul", macs)) if not qk_points and not av_points else None
    was_training = model.training
    try:
        if x is None:
            ref = next(iter(model.parameters()), None)
            device = ref.device if ref is not None else torch.device("cpu")
            dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
            x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            if spy is None:
                model(x)
            else:
                with spy:
                    model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"total": sum(kinds.values()), **kinds, "layers": layers}

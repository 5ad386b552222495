"""Every SR architecture spandrel knows (ESRGAN/RRDBNet, Real-ESRGAN Compact, SwinIR, HAT, DAT, RCAN, SPAN,
OmniSR, SAFMN, PLKSR, ...), built by spandrel and quantized by the generic rule (:mod:`.trace`).

`spandrel <https://github.com/chaiNNer-org/spandrel>`_ (the loader of chaiNNer and ComfyUI) recognises an
architecture and its hyperparameters from the keys and shapes of a state dict. quantsr asks it *after* its
own architectures (``ArchSpec.fallback``), so a file one of them knows (IMDN, BasicSR MSRResNet/EDSR,
EDSR-PyTorch, lightweight SwinIR) keeps the built-in model, whose quantization rule follows its paper.
``spandrel`` (and torchvision, which it imports) is imported here only, and only when a foreign
checkpoint is detected or a model of this family is built.

Hyperparameters (``model.hparams``, stored in quantsr files, enough to rebuild the model alone):

* ``net``: spandrel's architecture id (``"ESRGAN"``), or ``"quantsr:<arch>"`` for a built-in quantsr
  architecture taken down the generic path (``--arch`` set to this family's name on a built-in file);
* ``cls``: the model class as the architecture's module exports it (``"ESRGAN"``, ``"RealPLKSR"``);
* ``params``: the class's keyword arguments (spandrel's ``hyperparameters``; JSON values only);
* ``upscale``: the scale; ``size``: ``[minimum, multiple_of, square]`` input requirements: like spandrel's
  call, the forward pads the input (reflect, then replicate) to meet them and crops the output;
* ``fold``: re-parameterised blocks (SPAN's ``Conv3XC``) are folded into their inference conv
  (:data:`~quantsr_cli.models.reparam.REPARAMETERIZE`), so that they can be quantized; the model's keys are then the folded ones.

The model is the spandrel module itself, its class swapped for a subclass that adds the quantsr
contract (``arch``, ``hparams``, padding forward), so its state-dict keys are spandrel's. It has no
residual-block contract: ``--blocks``, QSA and feature distillation need a built-in architecture.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from quantsr_cli.config import SCALES
from quantsr_cli.errors import ConfigError
from quantsr_cli.models.common import MAX_SMALL, MAX_WIDTH, check_scale
from quantsr_cli.models.spec import ArchSpec, Hparams, LayoutNotSupported, StateDict
from quantsr_cli.models.reparam import fold_blocks
from quantsr_cli.models.trace import trace_rule

NAME = "spandrel"
BUILTIN = "quantsr:"
"""``net`` prefix of a built-in quantsr architecture on the generic path."""

DEFAULT_NET = ("Compact", "Compact", {"num_feat": 64, "num_conv": 16})
"""What ``build_model`` of this family builds without a checkpoint: Real-ESRGAN's general SRVGGNetCompact."""

_TRACE_SIDE = 32


def _spandrel() -> Any:
    """The spandrel package (imported now); LayoutNotSupported with the install hint when missing or broken
    (a torchvision built for another torch fails at import with ``operator torchvision::nms does not exist``)."""
    try:
        return importlib.import_module(NAME)
    except Exception as exc:  # noqa: BLE001 - ImportError, or RuntimeError from a mismatched torchvision
        raise LayoutNotSupported(f"architectures beyond quantsr's own need spandrel and torchvision ({exc}); "
                                 "pip install spandrel (with a torchvision matching your torch)") from None


def catalog() -> dict[str, Any]:
    """spandrel's version and architecture ids in detection order (imports spandrel)."""
    sp = _spandrel()
    return {"source": f"spandrel {sp.__version__}",
            "architectures": [str(s.architecture.id) for s in sp.MAIN_REGISTRY.architectures("detection")]}


class SpandrelSR(nn.Module):
    """Mixin put in front of a spandrel model's class: the quantsr model contract, nothing else.

    Only methods live here (attributes are set on the instance), so no name of the wrapped network
    (``self.blocks``, ``self.upscale``, ...) is shadowed.
    """

    def forward(self, x: Tensor) -> Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, 3, sH, sW)``, unclamped; pads to the size requirements."""
        minimum, multiple, square = self.size_req
        h, w = int(x.shape[-2]), int(x.shape[-1])
        ph, pw = _padded(h, minimum, multiple), _padded(w, minimum, multiple)
        if square:
            ph = pw = max(ph, pw)
        if (ph, pw) != (h, w):
            rw, rh = min(pw - w, w - 1), min(ph - h, h - 1)
            x = F.pad(x, (0, rw, 0, rh), "reflect") if rw or rh else x
            x = F.pad(x, (0, pw - w - rw, 0, ph - h - rh), "replicate") if pw - w - rw or ph - h - rh else x
        else:
            x = x.clone()  # some networks scale their input in place (RCAN: x *= rgb_range); never the caller's
        out = super().forward(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        s = self.upscale
        return out[..., : h * s, : w * s] if (ph, pw) != (h, w) else out

    def block_names(self) -> list[str]:
        """No residual-block contract for a foreign network."""
        return []

    def feature_points(self) -> list[str]:
        return []


def _padded(n: int, minimum: int, multiple: int) -> int:
    n = max(n, minimum)
    return -(-n // multiple) * multiple


@functools.cache
def _sr_class(cls: type) -> type:
    return type(f"Quantsr{cls.__name__}", (SpandrelSR, cls), {"__module__": __name__})


def build(net: str = DEFAULT_NET[0], cls: str = "", params: dict[str, Any] | None = None, upscale: int = 4,
          size: list[Any] | None = None, fold: bool = False) -> nn.Module:
    """The network ``net`` with keyword arguments ``params`` (see the module docstring), fresh weights.

    Raises:
        ConfigError: an unknown architecture or class, hyperparameters out of bounds, or a class that
            refuses them.
    """
    upscale = check_scale(upscale)
    minimum, multiple, square = _check_size(size if size is not None else [0, 1, False])
    if params is None:
        if net != DEFAULT_NET[0]:
            raise ConfigError(f"{NAME} net {net!r} needs its hyperparameters (params); load it from a checkpoint")
        cls, params = DEFAULT_NET[1], {**DEFAULT_NET[2], "upscale": upscale}
    params = _check_params(params)
    if not isinstance(net, str) or not isinstance(cls, str):
        raise ConfigError(f"{NAME}: net and cls must be names")
    try:
        if net.startswith(BUILTIN):
            from quantsr_cli.models.registry import ARCHS, build_model

            inner_spec = ARCHS.get(net[len(BUILTIN):])
            if inner_spec is None or inner_spec.fallback or inner_spec.family != "sr":
                raise ConfigError(f"unknown built-in architecture {net!r}")
            inner = build_model(net[len(BUILTIN):], **params)
        else:
            inner = _construct(_model_class(net, cls), params)
    except (TypeError, ValueError, AssertionError, AttributeError, KeyError) as exc:
        raise ConfigError(f"{NAME} {net} rejects its hyperparameters ({type(exc).__name__}: {exc})") from None
    if fold:
        fold_blocks(inner)
    if not net.startswith(BUILTIN):  # a built-in model already has the contract (and its blocks)
        inner.__class__ = _sr_class(type(inner))
    hparams = {"net": net, "cls": cls, "params": params, "upscale": upscale, "size": [minimum, multiple, square],
               **({"fold": True} if fold else {})}
    for key, value in (("arch", NAME), ("hparams", hparams), ("upscale", upscale),
                       ("size_req", (minimum, multiple, square)), ("quant_patterns", ()), ("derived_keys", ()),
                       ("qk_points", ()), ("av_points", ())):
        object.__setattr__(inner, key, value)
    return inner


PROBE_ELEMENTS = 1 << 26
"""Most tensor elements (256 MB of float32) a shape probe may allocate on the CPU (see :func:`_construct`)."""


class _Budget(TorchFunctionMode):
    """Refuses, before allocating, tensors beyond :data:`PROBE_ELEMENTS` elements in total."""

    def __init__(self) -> None:
        super().__init__()
        self.used = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            dims = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else args
            if all(isinstance(d, int) for d in dims):
                self.used += math.prod(dims)
                if self.used > PROBE_ELEMENTS:
                    raise ValueError(f"the hyperparameters describe more than {PROBE_ELEMENTS:,} weights")
        out = func(*args, **kwargs)
        if torch.is_tensor(out) and func not in _FACTORIES and out.is_leaf and out.numel() > PROBE_ELEMENTS:
            raise ValueError(f"the hyperparameters describe more than {PROBE_ELEMENTS:,} weights")
        return out


_FACTORIES = (torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint)


def _construct(klass: type, params: dict[str, Any]) -> nn.Module:
    """``klass(**params)``. Under the ``meta`` device (a shape probe) a class whose constructor needs real
    values (``linspace(...).item()``) is built on the CPU instead, within :data:`PROBE_ELEMENTS`, then
    moved to ``meta``: a file's metadata cannot make the probe allocate more than that."""
    if torch.get_default_device().type != "meta":
        return klass(**params)
    try:
        return klass(**params)
    except (RuntimeError, NotImplementedError):
        pass  # e.g. "Tensor.item() cannot be called on meta tensors"
    with torch.device("cpu"), _Budget():
        return klass(**params).to("meta")


def _model_class(net: str, cls: str) -> type:
    """The class ``cls`` that spandrel's architecture module ``net`` exports (only those; never any other import)."""
    support = _spandrel().MAIN_REGISTRY.get(net)
    if support is None:
        raise ConfigError(f"spandrel has no architecture {net!r} (spandrel {_spandrel().__version__})")
    module = importlib.import_module(type(support.architecture).__module__)
    klass = getattr(module, cls, None) if cls in getattr(module, "__all__", ()) else None
    if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
        raise ConfigError(f"spandrel architecture {net!r} exports no model class {cls!r}")
    return klass


def _check_size(size: Any) -> tuple[int, int, bool]:
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(type(v) is int for v in size[:2])
            and isinstance(size[2], bool) and 0 <= size[0] <= 1024 and 1 <= size[1] <= 1024):
        raise ConfigError(f"{NAME}: size={size!r} must be [minimum, multiple_of, square] (at most 1024)")
    return size[0], size[1], size[2]


def _check_value(key: str, value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 64):
        return value
    if isinstance(value, int) and abs(value) <= MAX_WIDTH:
        return value
    if isinstance(value, float) and math.isfinite(value) and abs(value) <= 1e6:
        return value
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= MAX_SMALL:
        return [_check_value(key, v, depth + 1) for v in value]
    raise ConfigError(f"{NAME}: hyperparameter {key}={str(value)[:40]!r} is not a bounded JSON value")


def _check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, Mapping) or len(params) > 64 or not all(isinstance(k, str) for k in params):
        raise ConfigError(f"{NAME}: params must map at most 64 argument names to values")
    return {k: _check_value(k, v) for k, v in params.items()}


def quant_rule(model: nn.Module) -> tuple[str, ...]:
    """The generic rule (:func:`.trace.trace_rule`); also sets ``model.fp_layers`` and ``model.unquantizable``
    (``{name: reason}``) and checks the output scale. A model on the meta device (a shape probe) is not run."""
    first = next(iter(model.parameters()), None)
    if first is not None and first.device.type == "meta":
        object.__setattr__(model, "fp_layers", {})
        object.__setattr__(model, "unquantizable", {})
        return ()
    x = torch.rand(2, 3, _TRACE_SIDE, _TRACE_SIDE, generator=torch.Generator().manual_seed(0)).to(first.device)
    try:
        result = trace_rule(model, x)
    except Exception as exc:  # noqa: BLE001 - a foreign forward can raise anything on a given input
        raise ConfigError(f"{model.hparams['net']} does not run on a {_TRACE_SIDE}x{_TRACE_SIDE} image "
                          f"({type(exc).__name__}: {str(exc)[:160]})") from None
    want = (2, 3, _TRACE_SIDE * model.upscale, _TRACE_SIDE * model.upscale)
    if result.output_shape != want:
        raise ConfigError(f"{model.hparams['net']} maps (2, 3, {_TRACE_SIDE}, {_TRACE_SIDE}) to {result.output_shape}, "
                          f"not x{model.upscale} RGB {want}")
    object.__setattr__(model, "fp_layers", result.fp)
    object.__setattr__(model, "unquantizable", result.unquantizable)
    return tuple(result.quantized)


_CACHE: dict[str, Any] = {}
"""The state dict in the model's layout from the last :func:`detect` (spandrel converts some layouts on load)."""


def detect(sd: StateDict) -> Hparams | None:
    """spandrel's detection; then (generic path) a built-in quantsr architecture's own detection."""
    found = _detect_spandrel(sd)
    if found is not None:
        return found
    from quantsr_cli.models.registry import ARCHS

    for spec in ARCHS.values():
        if not spec.fallback and spec.family == "sr":
            try:
                hp = spec.detect(sd)
            except (LayoutNotSupported, KeyError, ValueError, IndexError, TypeError):
                hp = None
            if hp is not None:
                converted = spec.convert(sd, hp) if spec.convert is not None else sd
                _CACHE.update(key=_key(sd), state=dict(converted))
                return {"net": BUILTIN + spec.name, "cls": "", "params": hp, "upscale": int(hp["upscale"]),
                        "size": [0, 1, False]}
    return None


def _key(sd: StateDict) -> tuple[int, int, str]:
    return id(sd), len(sd), next(iter(sd), "")


def _detect_spandrel(sd: StateDict) -> Hparams | None:
    sp = _spandrel()
    canon = sp.canonicalize_state_dict(dict(sd))
    support = next((s for s in sp.MAIN_REGISTRY.architectures("detection") if s.detect(canon)), None)
    if support is None:
        return None
    arch_id = str(support.architecture.id)
    try:
        descriptor = support.architecture.load(canon)
    except Exception as exc:  # noqa: BLE001 - spandrel's loaders raise anything on a near-miss layout
        raise LayoutNotSupported(f"looks like spandrel's {arch_id} but does not load "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    scale, ins, outs = descriptor.scale, descriptor.input_channels, descriptor.output_channels
    if not isinstance(descriptor, sp.ImageModelDescriptor) or scale not in SCALES or (ins, outs) != (3, 3):
        raise LayoutNotSupported(f"{arch_id} weights for a x{scale} {descriptor.purpose} model with {ins}->{outs} "
                                 f"channels; quantsr quantizes RGB x{'/x'.join(map(str, SCALES))} super-resolution")
    model = descriptor.model
    req = descriptor.size_requirements
    hparams = {"net": arch_id, "cls": _export_name(model, descriptor), "params": _hyperparameters(model, arch_id),
               "upscale": scale, "size": [int(req.minimum), int(req.multiple_of), bool(req.square)]}
    if fold_blocks(model.eval()):
        hparams["fold"] = True
    _CACHE.update(key=_key(sd), state=model.state_dict())
    return hparams


def _export_name(model: nn.Module, descriptor: Any) -> str:
    module = importlib.import_module(type(descriptor.architecture).__module__)
    for name in getattr(module, "__all__", ()):
        if getattr(module, name, None) is type(model):
            return name
    raise LayoutNotSupported(f"spandrel's {descriptor.architecture.id} builds a {type(model).__name__}, "
                             "which its module does not export")


def _hyperparameters(model: nn.Module, arch_id: str) -> dict[str, Any]:
    """spandrel's recorded constructor arguments as JSON values (non-JSON ones must be the defaults)."""
    hp = getattr(model, "hyperparameters", None)
    if not isinstance(hp, dict):
        raise LayoutNotSupported(f"spandrel's {arch_id} does not record its hyperparameters")
    defaults = {p.name: p.default for p in inspect.signature(type(model).__init__).parameters.values()}
    out = {}
    for key, value in hp.items():
        try:
            out[key] = _check_value(key, value)
        except ConfigError:
            if defaults.get(key, inspect.Parameter.empty) is not value:
                raise LayoutNotSupported(f"spandrel's {arch_id}: hyperparameter {key}={value!r} cannot be "
                                         "recorded in a model file") from None
    return out


def convert(sd: StateDict, hparams: Hparams) -> StateDict:
    """The state dict in the built model's layout: what spandrel loaded into its model at detection."""
    if _CACHE.get("key") == _key(sd):
        return _CACHE.pop("state")
    if detect(sd) is None:
        raise LayoutNotSupported("not a checkpoint spandrel recognises")
    return _CACHE.pop("state")


def label(hparams: Mapping[str, Any]) -> str:
    net = str(hparams["net"])
    return f"{net[len(BUILTIN):]} (generic path)" if net.startswith(BUILTIN) else f"{net} ({NAME})"


SPEC = ArchSpec(NAME, build, "any architecture spandrel detects (ESRGAN, Compact, SwinIR, HAT, DAT, RCAN, ...)",
                detect=detect, quant_rule=quant_rule, convert=convert, fallback=True, label=label, catalog=catalog)

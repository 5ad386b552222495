"""Pieces shared by the architecture files: the model base class, block shortcut, validation helpers.

Every model maps an RGB batch ``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, 3, s*H, s*W)`` (unclamped) and
exposes the plain data the rest of quantsr uses without importing any model file: ``arch``,
``hparams``, ``quant_patterns``, ``block_names()`` and ``feature_points()`` (see DEVELOPERS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from quantsr_cli.config import SCALES
from quantsr_cli.errors import ConfigError

MAX_BLOCKS = 1024
"""Upper bound on residual blocks / modules / Swin blocks in total: far above any published SR model,
low enough that building the module tree (on the meta device, before a file's tensors are checked)
stays cheap whatever a file's metadata claims."""

MAX_WIDTH = 4096
"""Upper bound on feature channels (``num_feat``, ``embed_dim``)."""

MAX_SMALL = 64
"""Upper bound on small structural counts (attention heads, window size, RSTB count)."""

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)
"""Per-channel RGB mean of DIV2K in ``[0, 1]``, subtracted by EDSR-style models and SwinIR."""


class SRModel(nn.Module):
    """Base class of every quantsr model.

    Attributes:
        arch: registry name (class attribute).
        quant_patterns: ``fnmatch`` patterns over ``named_modules()`` names; matching ``nn.Conv2d`` /
            ``nn.Linear`` are quantized, matching ``nn.Identity`` are activation points. Set by
            ``build_model`` from the arch spec's ``quant_rule``.
        act_points: ``fnmatch`` patterns of ``nn.Identity`` activation points that stay full precision
            unless a ``layers:`` rule gives them bits (e.g. IMDN's ``IMDB*.out_act``); empty for most models.
        qk_points, av_points: ``fnmatch`` patterns of the activation points whose inputs are the operands
            of attention matmuls (``q`` of ``q @ k^T``, the softmax output of ``attn @ v``), so that
            ``metrics.count_macs`` counts those matmuls; empty for models without attention.
        derived_keys: ``fnmatch`` patterns of state-dict keys that official checkpoints carry but this
            model recomputes and drops on load (e.g. SwinIR ``attn_mask``); empty for most models.
        hparams: the JSON-serialisable keyword arguments that rebuild the model (includes ``upscale``).
    """

    arch: str = ""
    quant_patterns: tuple[str, ...] = ()
    act_points: tuple[str, ...] = ()
    derived_keys: tuple[str, ...] = ()
    qk_points: tuple[str, ...] = ()
    av_points: tuple[str, ...] = ()

    def __init__(self, hparams: dict[str, object]) -> None:
        super().__init__()
        self.hparams = dict(hparams)
        self.upscale = int(hparams["upscale"])  # type: ignore[call-overload]

    def block_names(self) -> list[str]:
        """Names of the residual blocks, in forward order."""
        raise NotImplementedError

    def feature_points(self) -> list[str]:
        """Per block, the module whose *input* is that block's feature for feature distillation."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The residual block modules named by :meth:`block_names`."""
        return [self.get_submodule(name) for name in self.block_names()]


def init_shortcut(block: nn.Module, learnable: bool) -> None:
    """Give ``block`` a ``learnable_shortcut`` scalar (init 1) and ``skip = False``.

    With ``learnable=True`` the scalar is an ``nn.Parameter`` of shape ``(1,)`` and appears in the
    state dict as ``<block>.learnable_shortcut`` (QuantSR layout). With ``learnable=False`` it is a
    non-persistent buffer fixed at 1: it follows ``.to(device)``, multiplies the identity path
    exactly like the parameter would, but adds no state-dict key, so official checkpoints that have no
    such scalar still load strictly. Block removal (QSA/DQA) with a trainable scalar needs a model
    built with ``learnable_shortcut=True``.
    """
    if learnable:
        block.learnable_shortcut = nn.Parameter(torch.ones(1))
    else:
        block.register_buffer("learnable_shortcut", torch.ones(1), persistent=False)
    block.skip = False


def make_shortcuts_learnable(model: SRModel) -> bool:
    """Turn every block's fixed ``learnable_shortcut`` buffer into a trainable parameter (value kept).

    For block removal (QSA) on a model built with ``learnable_shortcut=False`` (official keys, e.g. a
    SwinIR-S ``--init``). ``model.hparams["learnable_shortcut"]`` becomes True, so the files the run writes
    rebuild with the parameter. Returns whether anything changed (False for archs without the option).
    """
    if "learnable_shortcut" not in model.hparams or model.hparams["learnable_shortcut"]:
        return False
    for block in model.blocks():
        value = block.learnable_shortcut.detach().clone()
        del block.learnable_shortcut  # the non-persistent buffer
        block.learnable_shortcut = nn.Parameter(value)
    model.hparams["learnable_shortcut"] = True
    return True


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, per sample (timm's ``drop_path``, as in SwinIR).

    In training mode with ``drop_prob = p > 0`` each sample's branch output is zeroed with probability
    ``p`` and otherwise scaled by ``1/(1 − p)`` (expectation unchanged); in eval mode, and always at
    ``p = 0``, it is the identity. The keep mask, one value per sample along dim 0, is drawn from the
    global CPU generator and moved to ``x``'s device, so a resumed training run (whose checkpoints hold
    the CPU generator state) draws the same masks on any device. No parameters or buffers: a model's
    state dict is the same with or without it.

    Args:
        drop_prob: ``p`` in ``[0, 1)``; may be changed later through the ``drop_prob`` attribute.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape ``(N, ...)`` -> same shape."""
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.floor(keep + torch.rand(shape)).to(device=x.device, dtype=x.dtype)
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4g}"


class Upsample(nn.Sequential):
    """BasicSR ``Upsample``: ``log2(s)`` x [conv ``F -> 4F``, PixelShuffle(2)] or conv ``F -> 9F`` + PixelShuffle(3).

    Keys: ``0`` (and ``2`` for x4) hold the convs. Input ``(N, F, H, W)`` -> ``(N, F, sH, sW)``.
    """

    def __init__(self, scale: int, num_feat: int) -> None:
        layers: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ConfigError(f"upscale={scale} is not supported; choose one of 2, 3, 4")
        super().__init__(*layers)


def check_scale(upscale: object) -> int:
    """Validate an ``upscale`` factor (one of :data:`quantsr_cli.config.SCALES`)."""
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale not in SCALES:
        raise ConfigError(f"upscale={upscale!r} is not supported; choose one of {', '.join(map(str, SCALES))}")
    return upscale


def check_int(name: str, value: object, minimum: int = 1, multiple_of: int = 1, maximum: int | None = None) -> int:
    """Validate an integer hyperparameter in ``[minimum, maximum]`` and divisible by ``multiple_of``."""
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple_of
            or (maximum is not None and value > maximum)):
        extra = f" and a multiple of {multiple_of}" if multiple_of > 1 else ""
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name}={_short(value)} must be an integer {bound}{extra}")
    return value


def check_float(name: str, value: object, minimum: float = 0.0, maximum: float = 1e6) -> float:
    """Validate a finite real hyperparameter in ``(minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum < value <= maximum:
        raise ConfigError(f"{name}={_short(value)} must be a number > {minimum} and <= {maximum:g}")
    return float(value)


def check_probability(name: str, value: object) -> float:
    """Validate a probability in ``[0, 1)`` (e.g. a stochastic-depth rate)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}={value!r} must be a number in [0, 1)")
    return float(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_bool(name: str, value: object) -> bool:
    """Validate a boolean hyperparameter."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")
    return value


def check_int_list(name: str, value: object, max_len: int = MAX_SMALL, maximum: int | None = None) -> list[int]:
    """Validate a non-empty list (at most ``max_len`` long) of positive integers (e.g. SwinIR ``depths``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or len(value) > max_len:
        raise ConfigError(f"{name}={_short(value)} must be a list of 1 to {max_len} positive integers")
    return [check_int(f"{name}[{i}]", v, maximum=maximum) for i, v in enumerate(value)]

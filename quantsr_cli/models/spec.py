"""What an architecture registers: :class:`ArchSpec`, its depth rule, and helpers for ``detect`` functions.

Each architecture file (``models/<arch>.py``) holds the model class *and* its spec, spandrel-style:
how to build it, how to recognise its weights (``detect``), which layers the papers quantize
(``quant_rule``) and how its depth is set and cut (``depth``). :mod:`quantsr_cli.models.registry`
lists the specs; nothing outside ``models/`` needs to know any architecture by name.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from quantsr_cli.config import SCALES
from quantsr_cli.errors import ConfigError
from quantsr_cli.models.common import SRModel

StateDict = Mapping[str, Tensor]
Hparams = dict[str, Any]


class LayoutNotSupported(ValueError):
    """Raised by a ``detect`` function: the keys are this architecture's, in a variant or at a scale quantsr
    does not build. Detection goes on with the other architectures and reports this message only when
    none of them recognises the file."""


@dataclass(frozen=True)
class DepthRule:
    """How the number of residual blocks of an architecture is read, set and cut.

    Attributes:
        count: ``hparams -> number of blocks`` (``len(model.block_names())`` of the model they build).
        resize: ``n -> hparams`` overrides for ``n`` freshly shaped blocks (``quantize --blocks n``,
            ``info --blocks n``; a deeper model than a checkpoint gets the checkpoint in its first blocks).
        keep: ``(hparams, kept indices) -> hparams`` overrides of the model holding only those blocks
            (QSA block removal compacts the trained model with it; the state dict is renumbered by
            ``slim.compact_state_dict`` over ``model.block_names()``).
    """

    count: Callable[[Mapping[str, Any]], int]
    resize: Callable[[int], Hparams]
    keep: Callable[[Mapping[str, Any], list[int]], Hparams]


def num_block_depth(key: str = "num_block") -> DepthRule:
    """The depth rule of a network whose blocks are counted by one integer hyperparameter ``key``."""
    return DepthRule(count=lambda hp: int(hp[key]), resize=lambda n: {key: n}, keep=lambda hp, kept: {key: len(kept)})


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    Attributes:
        name: registry key (``--arch`` value), equal to the built model's ``arch``.
        builder: callable taking the hyperparameters as keyword arguments and returning the model.
        description: one line for help texts.
        detect: ``state_dict -> hparams`` when the weights are this architecture's (official key layouts),
            ``None`` when they are not; raises :class:`LayoutNotSupported` for a recognised but unsupported
            variant. ``build_model(name, **hparams)`` must fit the state dict. Hyperparameters that leave no
            trace in the weights keep their defaults.
        quant_rule: ``model -> quant_patterns``: the layers the method quantizes, as ``fnmatch`` patterns over
            ``named_modules()`` names (Conv2d/Linear layers and ``nn.Identity`` activation points), following
            the paper and the authors' released code. :func:`~quantsr_cli.models.registry.build_model` sets
            ``model.quant_patterns`` from it.
        depth: how ``--blocks`` and block removal change the hyperparameters; ``None`` for a fixed depth.
        convert: ``(state_dict, hparams) -> state_dict`` in the model's own key layout, for files ``detect``
            recognises in another official layout (EDSR-PyTorch's ``head/body/tail`` names); ``None``: the
            file's keys are the model's.
        fallback: a family that recognises the files of many architectures (spandrel's): detection asks it
            after every other spec, so a built-in architecture keeps its own files.
        label: ``hparams -> str``, the architecture as users know it (``"ESRGAN (spandrel)"``); default: ``name``.
        pretrained: where the official full-precision weights come from (printed when a run starts from
            random weights); empty when there are none.
        catalog: for a fallback family, ``() -> {"source": ..., "architectures": [names]}``: what it
            recognises, for the documentation (may import the family's library).
        family: which contract the built model follows: ``"sr"`` (the SR model contract of DEVELOPERS.md:
            block names, feature points, learnable shortcuts; ``quantize``, ``slim``, ``distill``, ``info``)
            or ``"one-step-diffusion"`` (the one-step SR contract of :mod:`quantsr_cli.diffusion`;
            ``quantsr diffusion``). Every family loads and evaluates alike.
    """

    name: str
    builder: Callable[..., SRModel]
    description: str
    detect: Callable[[StateDict], Hparams | None]
    quant_rule: Callable[[SRModel], tuple[str, ...]]
    depth: DepthRule | None = None
    convert: Callable[[StateDict, Hparams], StateDict] | None = None
    fallback: bool = False
    label: Callable[[Mapping[str, Any]], str] | None = None
    pretrained: str = ""
    family: str = "sr"
    catalog: Callable[[], dict[str, Any]] | None = None

    def display(self, hparams: Mapping[str, Any]) -> str:
        """The architecture name for messages: ``label(hparams)`` or ``name``."""
        if self.label is not None:
            try:
                return self.label(hparams)
            except (KeyError, TypeError, ValueError):
                pass
        return self.name

    @property
    def defaults(self) -> dict[str, object]:
        """The builder's keyword arguments and their default values (tuples as lists)."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in params}

    def block_count(self, hparams: Mapping[str, Any]) -> int | None:
        """Blocks of the model ``hparams`` describe (None for a fixed-depth architecture or missing keys)."""
        if self.depth is None:
            return None
        try:
            return self.depth.count(hparams)
        except (KeyError, TypeError, ValueError):
            return None

    def with_blocks(self, blocks: int) -> Hparams:
        """Hyperparameter overrides for ``blocks`` blocks; ConfigError when the depth is fixed or ``blocks < 1``."""
        if self.depth is None:
            raise ConfigError(f"--blocks is not supported for arch {self.name!r}")
        if blocks < 1:
            raise ConfigError(f"--blocks {blocks} must be at least 1")
        return self.depth.resize(blocks)

    def keep_blocks(self, hparams: Mapping[str, Any], keep: list[int]) -> Hparams:
        """Hyperparameters of the model holding only blocks ``keep`` of the one ``hparams`` describe."""
        if self.depth is None:
            raise ConfigError(f"arch {self.name!r} has a fixed depth: its blocks cannot be removed")
        return {**hparams, **self.depth.keep(hparams, keep)}


def key_indices(sd: StateDict, pattern: str) -> list[int]:
    """Sorted indices captured by ``pattern`` over the keys; they must run 0..n-1 (or 1..n).

    Raises:
        ValueError: no key matches, or the indices have gaps.
    """
    found = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))})
    if not found or found != list(range(found[0], found[0] + len(found))) or found[0] not in (0, 1):
        raise ValueError(f"no contiguous keys matching {pattern!r}")
    return found


def shuffle_scale(channels: int, per_pixel: int) -> int:
    """Upscale factor ``s`` from a pixel-shuffle conv with ``per_pixel * s²`` output channels.

    Raises:
        ValueError: not such a channel count.
        LayoutNotSupported: a scale other than :data:`~quantsr_cli.config.SCALES`.
    """
    ratio, rem = divmod(int(channels), int(per_pixel))
    s = math.isqrt(ratio)
    if rem or s * s != ratio:
        raise ValueError(f"pixel-shuffle conv with {channels} output channels")
    if s not in SCALES:
        raise LayoutNotSupported(f"scale x{s} is not supported; choose one of {', '.join(map(str, SCALES))}")
    return s

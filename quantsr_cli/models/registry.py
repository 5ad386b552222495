"""The explicit architecture registry and the one model builder.

Each architecture file defines its model class and its :class:`~quantsr_cli.models.spec.ArchSpec`
(``SPEC``: build, detect, quantization rule, depth); registering it is one line in :data:`ARCHS`.
Detection (:func:`~quantsr_cli.models.loading.detect_arch`) tries the specs in this order, ``fallback``
families (spandrel's architectures, :mod:`~quantsr_cli.models.foreign`) after all others.
"""

from __future__ import annotations

from typing import Any

import torch

from quantsr_cli.errors import ConfigError
from quantsr_cli.models import foreign, imdn, osd_tiny, quantsr_c, srresnet, swinir
from quantsr_cli.models.common import SRModel
from quantsr_cli.models.spec import ArchSpec

ARCHS: dict[str, ArchSpec] = {spec.name: spec for spec in (
    quantsr_c.SPEC,
    srresnet.SPEC,
    swinir.SPEC,
    imdn.SPEC,
    osd_tiny.SPEC,
    foreign.SPEC,
)}
"""Registered architectures by name (``--arch`` values)."""


def arch_names(family: str = "sr") -> list[str]:
    """Names of the registered architectures of one family (``"sr"`` or ``"one-step-diffusion"``)."""
    return [name for name, spec in ARCHS.items() if spec.family == family]


def arch_spec(arch: str) -> ArchSpec:
    """The spec of ``arch``; ConfigError listing the registered names when it is unknown."""
    spec = ARCHS.get(arch)
    if spec is None:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return spec


def block_hparams(arch: str, blocks: int | None) -> dict[str, Any]:
    """Builder arguments that give ``arch`` ``blocks`` residual blocks (``{}`` for None).

    Raises:
        ConfigError: unknown arch, an arch of fixed depth, or ``blocks < 1``.
    """
    return {} if blocks is None else arch_spec(arch).with_blocks(blocks)


def build_model(arch: str, **hparams: object) -> SRModel:
    """Build a registered architecture with full-precision, freshly initialised weights.

    Args:
        arch: a key of :data:`ARCHS`.
        **hparams: builder keyword arguments (e.g. ``upscale=4, num_block=32``); omitted ones take
            the builder defaults. ``model.hparams`` afterwards holds all of them, and
            ``model.quant_patterns`` the layers the arch's ``quant_rule`` quantizes.

    Raises:
        ConfigError: unknown architecture, unknown hyperparameter or out-of-range value.
    """
    spec = arch_spec(arch)
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for arch {arch!r}; accepted: {', '.join(spec.defaults)}"
        )
    model = spec.builder(**hparams)
    model.quant_patterns = tuple(spec.quant_rule(model))
    return model


def probe_model(arch: str, **hparams: object) -> SRModel:
    """:func:`build_model` on the ``meta`` device: the module tree and every parameter's shape, no memory.

    Builders check their hyperparameters (types and upper bounds) before constructing anything, so
    this is cheap for any metadata; compare its ``state_dict()`` with a file's tensors
    (:func:`~quantsr_cli.models.loading.check_fits`) before building the real model.
    """
    with torch.device("meta"):
        return build_model(arch, **hparams)

"""The explicit architecture registry and the one model builder."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantsr_cli.errors import ConfigError
from quantsr_cli.models.common import SRModel
from quantsr_cli.models.imdn import IMDN
from quantsr_cli.models.osd_tiny import OSDSRTiny
from quantsr_cli.models.quantsr_c import QuantSRC
from quantsr_cli.models.srresnet import MSRResNet
from quantsr_cli.models.swinir import SwinIR


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture.

    Attributes:
        name: registry key (``--arch`` value), equal to the built model's ``arch``.
        builder: callable taking the hyperparameters as keyword arguments and returning the model.
        description: one line for help texts.
        family: which contract the built model follows: ``"sr"`` (the SR model contract of
            DEVELOPERS.md: block names, feature points, learnable shortcuts; ``quantsr quantize``,
            ``slim``, ``distill``) or ``"one-step-diffusion"`` (the one-step SR contract of
            :mod:`quantsr_cli.diffusion`; ``quantsr diffusion``). Every family loads and evaluates alike.
    """

    name: str
    builder: Callable[..., SRModel]
    description: str
    family: str = "sr"

    @property
    def defaults(self) -> dict[str, object]:
        """The builder's keyword arguments and their default values (tuples as lists)."""
        params = inspect.signature(self.builder).parameters.values()
        return {p.name: list(p.default) if isinstance(p.default, tuple) else p.default for p in params}


ARCHS: dict[str, ArchSpec] = {
    "quantsr-c": ArchSpec("quantsr-c", QuantSRC, "QuantSR(+)-C: EDSR-baseline-style conv net, 64 ch, N blocks"),
    "srresnet": ArchSpec("srresnet", MSRResNet, "BasicSR MSRResNet, 64 ch, 16 blocks, bilinear base"),
    "swinir-s": ArchSpec("swinir-s", SwinIR, "lightweight SwinIR (SwinIR-S), 60 ch, 4x6 Swin blocks, window 8"),
    "imdn": ArchSpec("imdn", IMDN, "IMDN (Hui et al. 2019), 64 ch, 6 IMDBs"),
    "osd-sr-tiny": ArchSpec("osd-sr-tiny", OSDSRTiny, "one-step diffusion SR (OSEDiff-shaped, small, CPU-trained)",
                            family="one-step-diffusion"),
}


def arch_names(family: str = "sr") -> list[str]:
    """Registered architectures of one ``family`` (:attr:`ArchSpec.family`), in registry order."""
    return [name for name, spec in ARCHS.items() if spec.family == family]


def build_model(arch: str, **hparams: object) -> SRModel:
    """Build a registered architecture with full-precision, freshly initialised weights.

    Args:
        arch: a key of :data:`ARCHS`.
        **hparams: builder keyword arguments (e.g. ``upscale=4, num_block=32``); omitted ones take
            the builder defaults. ``model.hparams`` afterwards holds all of them.

    Raises:
        ConfigError: unknown architecture, unknown hyperparameter or out-of-range value.
    """
    spec = ARCHS.get(arch)
    if spec is None:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for arch {arch!r}; accepted: {', '.join(spec.defaults)}"
        )
    return spec.builder(**hparams)


def probe_model(arch: str, **hparams: object) -> SRModel:
    """:func:`build_model` on the ``meta`` device: the module tree and every parameter's shape, no memory.

    Builders check their hyperparameters (types and upper bounds) before constructing anything, so
    this is cheap for any metadata; compare its ``state_dict()`` with a file's tensors
    (:func:`~quantsr_cli.models.loading.check_fits`) before building the real model.
    """
    with torch.device("meta"):
        return build_model(arch, **hparams)

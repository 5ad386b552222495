"""Super-resolution models with official state-dict layouts, the registry and ``.pth`` loading.

Public API::

    ARCHS: dict[str, ArchSpec]                 # the registry (models/registry.py); one SPEC per arch file
    arch_spec(arch) -> ArchSpec                # ConfigError on an unknown arch
    arch_names(family="sr") -> list[str]       # the SR archs, or family="one-step-diffusion"
    build_model(arch, **hparams) -> SRModel    # ConfigError on unknown arch / bad hyperparameter
    block_hparams(arch, blocks) -> hparams     # the arch's depth rule (--blocks)
    probe_model(arch, **hparams) -> SRModel    # the same on the meta device (shapes only, no memory)
    read_state_dict(path) -> dict[str, Tensor] # weights_only torch.load, unwraps params_ema/params/...
    load_weights(model, state_dict, path)      # strict, CheckpointError listing the mismatches
    check_fits(model, state_dict, path)        # the same check without copying (meta models too)
    detect_arch(state_dict) -> (arch, hparams) # guess the architecture and scale from keys/shapes

This package never imports quant, packing, engine or any CLI library.
"""

from quantsr_cli.models.common import SRModel, make_shortcuts_learnable
from quantsr_cli.models.loading import check_fits, detect_arch, load_weights, read_state_dict
from quantsr_cli.models.registry import ARCHS, arch_names, arch_spec, block_hparams, build_model, probe_model
from quantsr_cli.models.spec import ArchSpec, DepthRule, LayoutNotSupported

__all__ = ["ARCHS", "ArchSpec", "DepthRule", "LayoutNotSupported", "SRModel", "arch_names", "arch_spec", "block_hparams",
           "make_shortcuts_learnable", "build_model", "check_fits", "detect_arch", "load_weights", "probe_model", "read_state_dict"]

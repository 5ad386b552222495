"""Super-resolution models with official state-dict layouts, the registry and ``.pth`` loading.

Public API::

    ARCHS: dict[str, ArchSpec]                 # "quantsr-c", "srresnet", "swinir-s", "imdn"; "osd-sr-tiny"
    arch_names(family="sr") -> list[str]       # the SR archs, or family="one-step-diffusion"
    build_model(arch, **hparams) -> SRModel    # ConfigError on unknown arch / bad hyperparameter
    probe_model(arch, **hparams) -> SRModel    # the same on the meta device (shapes only, no memory)
    read_state_dict(path) -> dict[str, Tensor] # weights_only torch.load, unwraps params_ema/params/...
    load_weights(model, state_dict, path)      # strict, CheckpointError listing the mismatches
    check_fits(model, state_dict, path)        # the same check without copying (meta models too)
    detect_arch(state_dict) -> (arch, hparams) # guess the architecture and scale from keys/shapes

This package never imports quant, packing, engine or any CLI library.
"""

from quantsr_cli.models.common import SRModel
from quantsr_cli.models.loading import check_fits, detect_arch, load_weights, read_state_dict
from quantsr_cli.models.registry import ARCHS, ArchSpec, arch_names, build_model, probe_model

__all__ = ["ARCHS", "ArchSpec", "SRModel", "arch_names", "build_model", "check_fits", "detect_arch", "load_weights",
           "probe_model", "read_state_dict"]

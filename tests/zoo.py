"""Small random-weight SR models in their projects' official key layouts, for the foreign-checkpoint tests.

Ten are built by spandrel's own architecture classes (what chaiNNer and ComfyUI load); spandrel's ESRGAN
class uses the original ESRGAN ``model.N`` keys, so the Real-ESRGAN RRDBNet file is written under
Real-ESRGAN's names (``conv_first``, ``body.i.rdbK.convJ``, ``conv_body``, ``conv_up1/2``, ``conv_hr``,
``conv_last``). spandrel has no EDSR: the EDSR-PyTorch file (``head``/``body``/``tail`` plus the mean
shifts) is a BasicSR EDSR-baseline renamed key by key, as sanghyun-son/EDSR-PyTorch's ``edsr.py`` names it.
Every model is a few hundred kB at most, so each CLI run stays around a second.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def _esrgan_real_esrgan_keys() -> StateDict:
    from spandrel.architectures.ESRGAN import ESRGAN

    old = ESRGAN(num_filters=16, num_blocks=2, scale=4).state_dict()
    names = {"model.0": "conv_first", "model.1.sub.2": "conv_body", "model.3": "conv_up1", "model.6": "conv_up2",
             "model.8": "conv_hr", "model.10": "conv_last"}
    out = {}
    for key, value in old.items():
        layer, _, leaf = key.rpartition(".")
        if layer.startswith("model.1.sub.") and ".RDB" in layer:  # model.1.sub.i.RDBk.convj.0
            _, _, _, i, rdb, conv, _ = layer.split(".")
            layer = f"body.{i}.rdb{rdb[3:]}.{conv}"
        else:
            layer = names[layer]
        out[f"{layer}.{leaf}"] = value
    return out


def _edsr_pytorch_keys() -> StateDict:
    from quantsr_cli.models import build_model

    basic = build_model("quantsr-c", upscale=2, num_block=2, num_feat=16, learnable_shortcut=False).state_dict()
    mean = torch.tensor((0.4488, 0.4371, 0.4040)) * 255.0
    out = {"sub_mean.weight": torch.eye(3).view(3, 3, 1, 1), "sub_mean.bias": -mean}
    for key, value in basic.items():
        layer, _, leaf = key.rpartition(".")
        parts = layer.split(".")
        if layer == "conv_first":
            layer = "head.0"
        elif parts[0] == "body":
            layer = f"body.{parts[1]}.body.{0 if parts[2] == 'conv1' else 2}"
        elif layer == "conv_after_body":
            layer = "body.2"
        elif parts[0] == "upsample":
            layer = f"tail.0.{parts[1]}"
        elif layer == "conv_last":
            layer = "tail.1"
        out[f"{layer}.{leaf}"] = value
    out.update({"add_mean.weight": torch.eye(3).view(3, 3, 1, 1), "add_mean.bias": mean})
    return out


def _spandrel(module: str, cls: str, **kwargs: object) -> Callable[[], StateDict]:
    def make() -> StateDict:
        import importlib

        return getattr(importlib.import_module(f"spandrel.architectures.{module}"), cls)(**kwargs).state_dict()

    return make


ZOO: dict[str, tuple[Callable[[], StateDict], int, str]] = {
    # name: (state dict maker, scale, detected label)
    "realesrgan_rrdbnet": (_esrgan_real_esrgan_keys, 4, "ESRGAN (spandrel)"),
    "realesrgan_compact": (_spandrel("Compact", "Compact", num_feat=16, num_conv=4, upscale=4), 4,
                           "Compact (spandrel)"),
    "swinir_classical": (_spandrel("SwinIR", "SwinIR", img_size=16, embed_dim=24, depths=[2], num_heads=[2],
                                   window_size=4, mlp_ratio=2.0, upscale=2, upsampler="pixelshuffle"), 2,
                         "SwinIR (spandrel)"),
    "rcan": (_spandrel("RCAN", "RCAN", scale=2, n_resgroups=1, n_resblocks=2, n_feats=16, reduction=4), 2,
             "RCAN (spandrel)"),
    "edsr_pytorch": (_edsr_pytorch_keys, 2, "quantsr-c"),
    "hat": (_spandrel("HAT", "HAT", img_size=16, embed_dim=24, depths=[2], num_heads=[2], window_size=4,
                      compress_ratio=3, squeeze_factor=4, upscale=2, num_feat=16, mlp_ratio=2.0), 2, "HAT (spandrel)"),
    "span": (_spandrel("SPAN", "SPAN", num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=4), 4,
             "SPAN (spandrel)"),
    "omnisr": (_spandrel("OmniSR", "OmniSR", num_feat=16, block_num=1, window_size=4, res_num=1, up_scale=4), 4,
               "OmniSR (spandrel)"),
    "dat": (_spandrel("DAT", "DAT", img_size=16, embed_dim=24, split_size=[2, 4], depth=[2], num_heads=[2],
                      expansion_factor=2.0, upscale=2), 2, "DAT (spandrel)"),
    "safmn": (_spandrel("SAFMN", "SAFMN", dim=16, n_blocks=1, upscaling_factor=4), 4, "SAFMN (spandrel)"),
    "plksr": (_spandrel("PLKSR", "PLKSR", dim=16, n_blocks=2, upscaling_factor=4, kernel_size=7), 4,
              "PLKSR (spandrel)"),
}
"""Eleven architectures: RRDBNet, SRVGGNetCompact, classical SwinIR, RCAN, EDSR-PyTorch naming, HAT, SPAN,
OmniSR, DAT, SAFMN, PLKSR."""


def write_zoo(folder: Path) -> dict[str, tuple[Path, Path]]:
    """``{name: (model.pth, model.safetensors)}``, the same random weights in both (``.pth`` wrapped in
    BasicSR's ``params_ema``, as Real-ESRGAN's releases are)."""
    from safetensors.torch import save_file

    out = {}
    for i, (name, (make, _, _)) in enumerate(ZOO.items()):
        torch.manual_seed(i)
        state = {k: v.detach().clone().contiguous() for k, v in make().items()}
        pth, st = folder / f"{name}.pth", folder / f"{name}.safetensors"
        torch.save({"params_ema": state}, pth)
        save_file(state, str(st))
        out[name] = (pth, st)
    return out

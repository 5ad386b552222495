"""QuantSR-C / QuantSR+-C: the EDSR-baseline-style conv network of the QuantSR code releases.

Layout (state-dict keys, BasicSR EDSR naming plus one scalar per block)::

    conv_first.{weight,bias}                 3 -> F, 3x3              (full precision)
    body.{i}.conv1 / body.{i}.conv2          F -> F, 3x3              (quantized)
    body.{i}.learnable_shortcut              (1,)                     (with learnable_shortcut=True)
    conv_after_body.{weight,bias}            F -> F, 3x3              (full precision)
    upsample.0 [, upsample.2]                F -> 4F (x2, x4) or 9F (x3), then PixelShuffle
    conv_last.{weight,bias}                  F -> 3, 3x3

A model built with ``learnable_shortcut=False`` has exactly the BasicSR ``EDSR`` keys, so BasicSR EDSR
checkpoints (e.g. EDSR-M, ``num_feat=64, num_block=16``) load strictly; EDSR-PyTorch checkpoints
(``head``/``body``/``tail`` names) are renamed to them on load (:func:`convert`). ``res_scale`` leaves no
trace in the weights: EDSR-L (256 ch, 32 blocks) needs ``res_scale=0.1`` passed explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantsr_cli.models.common import (
    MAX_BLOCKS,
    MAX_WIDTH,
    DIV2K_RGB_MEAN,
    SRModel,
    Upsample,
    check_bool,
    check_float,
    check_int,
    check_scale,
    init_shortcut,
)
from quantsr_cli.models.spec import ArchSpec, Hparams, LayoutNotSupported, StateDict, key_indices, num_block_depth, shuffle_scale

IMG_RANGE = 255.0


class ResBlock(nn.Module):
    """Residual block without BN: ``y = ls * x + res_scale * conv2(relu(conv1(x)))``.

    ``relu`` is a separate, non-in-place module so a forward pre-hook on it sees ``conv1(x)``
    (the pre-activation). When ``skip`` is True the block returns ``x * learnable_shortcut``.
    Shapes: ``(N, F, H, W) -> (N, F, H, W)``.
    """

    def __init__(self, num_feat: int, res_scale: float, learnable_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.res_scale = res_scale
        init_shortcut(self, learnable_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x * self.learnable_shortcut
        return x * self.learnable_shortcut + self.conv2(self.relu(self.conv1(x))) * self.res_scale


class QuantSRC(SRModel):
    """QuantSR-C backbone (EDSR-baseline style, no BN, FP head/tail).

    Args:
        upscale: 2, 3 or 4.
        num_block: residual blocks (32 in QuantSR+; 16 and 8 are the slimmed depths).
        num_feat: feature channels (64).
        res_scale: residual branch scale (1.0; EDSR-L uses 0.1).
        learnable_shortcut: store ``body.i.learnable_shortcut`` as a trainable parameter (QuantSR
            layout, default); False gives plain BasicSR EDSR keys with a fixed shortcut of 1.

    Input ``(N, 3, H, W)`` RGB in ``[0, 1]``; normalised as ``(x - mean) * 255`` inside; output
    ``(N, 3, sH, sW)`` in ``[0, 1]`` (unclamped).
    """

    arch = "quantsr-c"

    def __init__(
        self,
        upscale: int = 4,
        num_block: int = 16,
        num_feat: int = 64,
        res_scale: float = 1.0,
        learnable_shortcut: bool = True,
    ) -> None:
        upscale = check_scale(upscale)
        num_block = check_int("num_block", num_block, maximum=MAX_BLOCKS)
        num_feat = check_int("num_feat", num_feat, maximum=MAX_WIDTH)
        res_scale = check_float("res_scale", res_scale)
        learnable_shortcut = check_bool("learnable_shortcut", learnable_shortcut)
        super().__init__(
            {
                "upscale": upscale,
                "num_block": num_block,
                "num_feat": num_feat,
                "res_scale": res_scale,
                "learnable_shortcut": learnable_shortcut,
            }
        )
        self.register_buffer("mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(ResBlock(num_feat, res_scale, learnable_shortcut) for _ in range(num_block)))
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = Upsample(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Upscale ``x`` ``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, 3, sH, sW)``."""
        mean = self.mean.to(x.dtype)
        feat = self.conv_first((x - mean) * IMG_RANGE)
        res = self.conv_after_body(self.body(feat)) + feat
        return self.conv_last(self.upsample(res)) / IMG_RANGE + mean

    def block_names(self) -> list[str]:
        return [f"body.{i}" for i in range(len(self.body))]

    def feature_points(self) -> list[str]:
        """``body.i.relu``: its input is ``conv1(x)`` of block ``i`` (QuantSR+ SFD hooks the ReLU)."""
        return [f"body.{i}.relu" for i in range(len(self.body))]


def quant_rule(model: SRModel) -> tuple[str, ...]:
    """QuantSR(+)-C: both convs of every residual block; head, body tail and upsampler stay FP."""
    return ("body.*.conv1", "body.*.conv2")


def _edsr_pytorch(sd: StateDict) -> bool:
    """EDSR-PyTorch naming (``head.0``, ``body.i.body.0/2``, ``body.N``, ``tail.0.*``, ``tail.1``); RCAN, whose
    keys also start with ``head``/``body``/``tail``, has ``body.i.body.j.body.k`` instead."""
    return {"head.0.weight", "body.0.body.0.weight", "tail.1.weight"} <= set(sd)


def _detect_edsr_pytorch(sd: StateDict) -> Hparams:
    """sanghyun-son/EDSR-PyTorch ``EDSR`` keys: the same network under other names, plus the fixed
    ``sub_mean``/``add_mean`` convs, which must be the DIV2K mean at RGB range 255 (what this model applies)."""
    num_feat = sd["head.0.weight"].shape[0]
    num_block = len(key_indices(sd, r"body\.(\d+)\.body\.0\.weight"))
    if f"body.{num_block}.weight" not in sd:
        raise ValueError("EDSR-PyTorch weights without the conv after the body")
    if "tail.0.4.weight" in sd:
        raise LayoutNotSupported("EDSR-PyTorch x8 weights; quantsr supports x2, x3 and x4")
    upscale = 4 if "tail.0.2.weight" in sd else shuffle_scale(sd["tail.0.0.weight"].shape[0], num_feat)
    mean = torch.tensor(DIV2K_RGB_MEAN) * IMG_RANGE
    for key, sign in (("sub_mean", -1.0), ("add_mean", 1.0)):
        if f"{key}.weight" in sd:
            w, b = sd[f"{key}.weight"].float().reshape(3, 3), sd[f"{key}.bias"].float()
            if not (torch.allclose(w, torch.eye(3), atol=1e-4) and torch.allclose(b, sign * mean, atol=1e-2)):
                raise LayoutNotSupported(f"EDSR-PyTorch {key} is not the DIV2K mean at RGB range 255")
    return {"upscale": upscale, "num_block": num_block, "num_feat": num_feat, "learnable_shortcut": False}


def detect(sd: StateDict) -> Hparams | None:
    """BasicSR EDSR keys (``conv_first``, ``body.i.conv1/2``, ``conv_after_body``, ``upsample.0``), or
    EDSR-PyTorch's (converted by :func:`convert`)."""
    if _edsr_pytorch(sd):
        return _detect_edsr_pytorch(sd)
    if not {"conv_after_body.weight", "body.0.conv1.weight", "upsample.0.weight"} <= set(sd):
        return None
    num_feat = sd["conv_first.weight"].shape[0]
    if "upsample.4.weight" in sd:
        raise ValueError("more than two upsampling stages (x8)")
    upscale = 4 if "upsample.2.weight" in sd else shuffle_scale(sd["upsample.0.weight"].shape[0], num_feat)
    return {
        "upscale": upscale,
        "num_block": len(key_indices(sd, r"body\.(\d+)\.conv1\.weight")),
        "num_feat": num_feat,
        "learnable_shortcut": "body.0.learnable_shortcut" in sd,
    }


def convert(sd: StateDict, hparams: Hparams) -> StateDict:
    """EDSR-PyTorch keys renamed to this model's (``head.0`` -> ``conv_first``, ``body.i.body.0/2`` ->
    ``body.i.conv1/2``, ``body.N`` -> ``conv_after_body``, ``tail.0.k`` -> ``upsample.k``, ``tail.1`` ->
    ``conv_last``; the mean-shift convs dropped); any other layout unchanged."""
    if not _edsr_pytorch(sd):
        return sd
    n = int(hparams["num_block"])
    out = {}
    for key, value in sd.items():
        name, _, leaf = key.rpartition(".")
        parts = name.split(".")
        if parts[0] in ("sub_mean", "add_mean"):
            continue
        if name == "head.0":
            name = "conv_first"
        elif name == f"body.{n}":
            name = "conv_after_body"
        elif parts[0] == "body" and len(parts) == 4 and parts[2] == "body":
            name = f"body.{parts[1]}.conv{1 if parts[3] == '0' else 2}"
        elif name.startswith("tail.0."):
            name = "upsample." + name[len("tail.0."):]
        elif name == "tail.1":
            name = "conv_last"
        out[f"{name}.{leaf}"] = value
    return out


SPEC = ArchSpec("quantsr-c", QuantSRC, "QuantSR(+)-C: EDSR-baseline-style conv net, 64 ch, N blocks",
                detect=detect, quant_rule=quant_rule, depth=num_block_depth(), convert=convert,
                pretrained="BasicSR's EDSR_Mx4_f64b16_DIV2K_official-0c287733.pth "
                           "(github.com/XPixelGroup/BasicSR, docs/ModelZoo.md) or EDSR-PyTorch's edsr_baseline_x4")

"""QuantSR-C / QuantSR+-C: the EDSR-baseline-style conv network of the QuantSR code releases.

Layout (state-dict keys, BasicSR EDSR naming plus one scalar per block)::

    conv_first.{weight,bias}                 3 -> F, 3x3              (full precision)
    body.{i}.conv1 / body.{i}.conv2          F -> F, 3x3              (quantized)
    body.{i}.learnable_shortcut              (1,)                     (with learnable_shortcut=True)
    conv_after_body.{weight,bias}            F -> F, 3x3              (full precision)
    upsample.0 [, upsample.2]                F -> 4F (x2, x4) or 9F (x3), then PixelShuffle
    conv_last.{weight,bias}                  F -> 3, 3x3

A model built with ``learnable_shortcut=False`` has exactly the BasicSR ``EDSR`` keys, so BasicSR EDSR
checkpoints (e.g. EDSR-M, ``num_feat=64, num_block=16``) load strictly.
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


def detect(sd: StateDict) -> Hparams | None:
    """BasicSR EDSR keys (``conv_first``, ``body.i.conv1/2``, ``conv_after_body``, ``upsample.0``)."""
    if not {"conv_after_body.weight", "body.0.conv1.weight", "upsample.0.weight"} <= set(sd):
        if "head.0.weight" in sd and "tail.0.0.weight" in sd:
            raise LayoutNotSupported("EDSR-PyTorch naming (head/body/tail) is not supported; use BasicSR EDSR keys")
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


SPEC = ArchSpec("quantsr-c", QuantSRC, "QuantSR(+)-C: EDSR-baseline-style conv net, 64 ch, N blocks",
                detect=detect, quant_rule=quant_rule, depth=num_block_depth())

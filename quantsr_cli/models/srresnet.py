"""MSRResNet (BasicSR ``MSRResNet``): SRResNet without BN, LeakyReLU(0.1), bilinear base added.

Layout (BasicSR keys, loads ``001_MSRResNet_x4_f64b16_DIV2K_*.pth`` strictly)::

    conv_first                       3 -> F, 3x3
    body.{i}.conv1 / body.{i}.conv2  F -> F, 3x3 (ReLU between; identity + residual)
    upconv1 [, upconv2]              x4: two F -> 4F + PixelShuffle(2); x2/x3: one F -> s^2 F + PixelShuffle(s)
    conv_hr                          F -> F, 3x3
    conv_last                        F -> 3, 3x3

``learnable_shortcut``: BasicSR checkpoints have no per-block scalar, so by default each block's
``learnable_shortcut`` is a non-persistent buffer fixed at 1 (no state-dict key). Build with
``learnable_shortcut=True`` to make it a trainable ``body.i.learnable_shortcut`` parameter (needed for
QSA/DQA block removal); such a model's checkpoints then carry that key.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from quantsr_cli.models.common import MAX_BLOCKS, MAX_WIDTH, SRModel, check_bool, check_int, check_scale, init_shortcut
from quantsr_cli.models.spec import ArchSpec, Hparams, StateDict, key_indices, num_block_depth, shuffle_scale

LRELU_SLOPE = 0.1


def _scaled_kaiming_(modules: list[nn.Module], scale: float = 0.1) -> None:
    """BasicSR ``default_init_weights``: Kaiming-normal (fan_in) conv weights times ``scale``, zero bias."""
    for module in modules:
        assert isinstance(module, nn.Conv2d)
        nn.init.kaiming_normal_(module.weight)
        module.weight.data.mul_(scale)
        if module.bias is not None:
            module.bias.data.zero_()


class ResBlock(nn.Module):
    """BasicSR ``ResidualBlockNoBN``: ``y = ls * x + conv2(relu(conv1(x)))``; skipped: ``x * ls``.

    ``relu`` is a non-in-place module (a pre-hook on it sees ``conv1(x)``). Shapes ``(N, F, H, W)``.
    """

    def __init__(self, num_feat: int, learnable_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        _scaled_kaiming_([self.conv1, self.conv2])
        init_shortcut(self, learnable_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x * self.learnable_shortcut
        return x * self.learnable_shortcut + self.conv2(self.relu(self.conv1(x)))


class MSRResNet(SRModel):
    """Modified SRResNet (BasicSR).

    Args:
        upscale: 2, 3 or 4.
        num_block: residual blocks (16).
        num_feat: feature channels (64).
        learnable_shortcut: see the module docstring (default False: official keys).

    Input ``(N, 3, H, W)`` RGB in ``[0, 1]`` (no mean shift); output ``(N, 3, sH, sW)`` in ``[0, 1]``,
    unclamped: the network predicts a residual over the bilinear upscaling of the input.
    """

    arch = "srresnet"

    def __init__(
        self, upscale: int = 4, num_block: int = 16, num_feat: int = 64, learnable_shortcut: bool = False
    ) -> None:
        upscale = check_scale(upscale)
        num_block = check_int("num_block", num_block, maximum=MAX_BLOCKS)
        num_feat = check_int("num_feat", num_feat, maximum=MAX_WIDTH)
        learnable_shortcut = check_bool("learnable_shortcut", learnable_shortcut)
        super().__init__(
            {"upscale": upscale, "num_block": num_block, "num_feat": num_feat, "learnable_shortcut": learnable_shortcut}
        )
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(ResBlock(num_feat, learnable_shortcut) for _ in range(num_block)))
        if upscale == 4:
            self.upconv1 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.upconv2 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(2)
        else:
            self.upconv1 = nn.Conv2d(num_feat, num_feat * upscale**2, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(upscale)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(LRELU_SLOPE)
        _scaled_kaiming_([self.conv_first, self.upconv1, self.conv_hr, self.conv_last])
        if upscale == 4:
            _scaled_kaiming_([self.upconv2])

    def forward(self, x: Tensor) -> Tensor:
        """Upscale ``x`` ``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, 3, sH, sW)``."""
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.upscale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        base = F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return out + base

    def block_names(self) -> list[str]:
        return [f"body.{i}" for i in range(len(self.body))]

    def feature_points(self) -> list[str]:
        """``body.i.relu``: its input is ``conv1(x)`` of block ``i``."""
        return [f"body.{i}.relu" for i in range(len(self.body))]


def quant_rule(model: SRModel) -> tuple[str, ...]:
    """Both convs of every residual block (as QuantSR-C); head, upsampler and tail stay FP."""
    return ("body.*.conv1", "body.*.conv2")


def detect(sd: StateDict) -> Hparams | None:
    """BasicSR MSRResNet keys (``upconv1`` and ``body.i.conv1``)."""
    if "upconv1.weight" not in sd or "body.0.conv1.weight" not in sd:
        return None
    num_feat = sd["conv_first.weight"].shape[0]
    upscale = 4 if "upconv2.weight" in sd else shuffle_scale(sd["upconv1.weight"].shape[0], num_feat)
    return {
        "upscale": upscale,
        "num_block": len(key_indices(sd, r"body\.(\d+)\.conv1\.weight")),
        "num_feat": num_feat,
        "learnable_shortcut": "body.0.learnable_shortcut" in sd,
    }


SPEC = ArchSpec("srresnet", MSRResNet, "BasicSR MSRResNet, 64 ch, 16 blocks, bilinear base",
                detect=detect, quant_rule=quant_rule, depth=num_block_depth(),
                pretrained="BasicSR's 001_MSRResNet_x4_f64b16_DIV2K_1000k_B16G1_wandb-6a8c0a8e.pth "
                           "(github.com/XPixelGroup/BasicSR, docs/ModelZoo.md)")

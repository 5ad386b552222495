"""IMDN (Hui et al., "Lightweight Image Super-Resolution with Information Multi-distillation Network", 2019).

Layout (official ``Zheng222/IMDN`` keys; the released ``IMDN_x{2,3,4}.pth`` load strictly after
stripping ``module.``; 92 tensors)::

    fea_conv                         3 -> F, 3x3                                   (full precision)
    IMDB{k}.c1                       F -> F, 3x3            k = 1..num_modules     (quantized)
    IMDB{k}.c2, IMDB{k}.c3           3F/4 -> F, 3x3                                (quantized)
    IMDB{k}.c4                       3F/4 -> F/4, 3x3                              (quantized)
    IMDB{k}.c5                       F -> F, 1x1                                   (quantized)
    IMDB{k}.cca.conv_du.{0,2}        F -> F/16 -> F, 1x1 (contrast channel attn)   (full precision)
    c.0                              num_modules*F -> F, 1x1, then LeakyReLU(0.05) (quantized)
    LR_conv                          F -> F, 3x3                                   (quantized)
    upsampler.0                      F -> 3 s^2, 3x3, then PixelShuffle(s)         (full precision)

The CCA convs are tiny (4 x 64 weights each, applied to a 1x1 pooled vector) and stay in full
precision, like the first and last convs.

Optional activation points (``act_points``; full precision, so absent from the state dict, unless a
``layers:`` rule gives them bits): ``IMDB{k}.cat_act`` on the distillation concatenation (the CCA's
input) and ``IMDB{k}.out_act`` on the block's output (the residual stream). At 8 bits they let a runtime
keep those tensors in u8 (``bench/ov_headroom.py``).

Blocks and skip: ``IMDB{k}`` is already residual inside (``y = c5(cca(distilled)) + x``). Each block
gets ``learnable_shortcut`` multiplying that inner identity (``y = ls * x + c5(...)``); it is a
non-persistent buffer fixed at 1 unless built with ``learnable_shortcut=True`` (then the key
``IMDB{k}.learnable_shortcut`` exists). A skipped block returns ``x * ls``. Because IMDN also feeds
every block's output to the fusion conv ``c`` (a concatenation), a skipped block still contributes
its (scaled) input there: skipping removes the block's computation, not its slot in ``c``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantsr_cli.models.common import MAX_BLOCKS, MAX_WIDTH, SRModel, check_bool, check_int, check_scale, init_shortcut
from quantsr_cli.models.spec import ArchSpec, Hparams, StateDict, key_indices, shuffle_scale

LRELU_SLOPE = 0.05


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, 1, (k - 1) // 2)


class CCALayer(nn.Module):
    """Contrast-aware channel attention: ``x * sigmoid(W2 relu(W1 (std_hw(x) + mean_hw(x))))``.

    Shapes ``(N, C, H, W) -> (N, C, H, W)``; ``std_hw`` is the population std over H and W.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, 1, 0),
            nn.ReLU(),
            nn.Conv2d(channels // reduction, channels, 1, 1, 0),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        # clamp_min: a constant channel (common once weights are 2-bit) has variance 0, where sqrt's
        # gradient is infinite and training turns to NaN; below 1e-12 the value is unchanged in practice.
        std = (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).clamp_min(1e-12).sqrt()
        return x * self.conv_du(std + mean)


class IMDB(nn.Module):
    """Information multi-distillation block (official ``IMDModule``, distillation rate 1/4).

    Shapes ``(N, F, H, W) -> (N, F, H, W)``; ``F`` must be a multiple of 4 (and of 16 for the CCA).
    """

    def __init__(self, num_feat: int, learnable_shortcut: bool) -> None:
        super().__init__()
        self.distilled = num_feat // 4
        self.remaining = num_feat - self.distilled
        self.c1 = _conv(num_feat, num_feat, 3)
        self.c2 = _conv(self.remaining, num_feat, 3)
        self.c3 = _conv(self.remaining, num_feat, 3)
        self.c4 = _conv(self.remaining, self.distilled, 3)
        self.act = nn.LeakyReLU(LRELU_SLOPE)
        self.c5 = _conv(num_feat, num_feat, 1)
        self.cca = CCALayer(self.distilled * 4)
        self.cat_act = nn.Identity()
        self.out_act = nn.Identity()
        init_shortcut(self, learnable_shortcut)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x * self.learnable_shortcut
        split = (self.distilled, self.remaining)
        d1, r1 = torch.split(self.act(self.c1(x)), split, dim=1)
        d2, r2 = torch.split(self.act(self.c2(r1)), split, dim=1)
        d3, r3 = torch.split(self.act(self.c3(r2)), split, dim=1)
        d4 = self.c4(r3)
        fused = self.c5(self.cca(self.cat_act(torch.cat([d1, d2, d3, d4], dim=1))))
        return self.out_act(x * self.learnable_shortcut + fused)


class IMDN(SRModel):
    """IMDN.

    Args:
        upscale: 2, 3 or 4.
        num_feat: feature channels (64; a multiple of 16).
        num_modules: number of IMDBs (6), named ``IMDB1`` ... ``IMDB{num_modules}``.
        learnable_shortcut: see the module docstring (default False: official keys).

    Input ``(N, 3, H, W)`` RGB in ``[0, 1]`` (no mean shift); output ``(N, 3, sH, sW)`` in ``[0, 1]``,
    unclamped.
    """

    arch = "imdn"
    act_points = ("IMDB*.cat_act", "IMDB*.out_act")

    def __init__(
        self, upscale: int = 4, num_feat: int = 64, num_modules: int = 6, learnable_shortcut: bool = False
    ) -> None:
        upscale = check_scale(upscale)
        num_feat = check_int("num_feat", num_feat, minimum=16, multiple_of=16, maximum=MAX_WIDTH)
        num_modules = check_int("num_modules", num_modules, maximum=MAX_BLOCKS)
        learnable_shortcut = check_bool("learnable_shortcut", learnable_shortcut)
        super().__init__(
            {
                "upscale": upscale,
                "num_feat": num_feat,
                "num_modules": num_modules,
                "learnable_shortcut": learnable_shortcut,
            }
        )
        self.num_modules = num_modules
        self.fea_conv = _conv(3, num_feat, 3)
        for k in range(1, num_modules + 1):
            self.add_module(f"IMDB{k}", IMDB(num_feat, learnable_shortcut))
        self.c = nn.Sequential(_conv(num_feat * num_modules, num_feat, 1), nn.LeakyReLU(LRELU_SLOPE))
        self.LR_conv = _conv(num_feat, num_feat, 3)
        self.upsampler = nn.Sequential(_conv(num_feat, 3 * upscale**2, 3), nn.PixelShuffle(upscale))

    def forward(self, x: Tensor) -> Tensor:
        """Upscale ``x`` ``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, 3, sH, sW)``."""
        fea = self.fea_conv(x)
        outs = []
        out = fea
        for block in self.blocks():
            out = block(out)
            outs.append(out)
        lr = self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea
        return self.upsampler(lr)

    def block_names(self) -> list[str]:
        return [f"IMDB{k}" for k in range(1, self.num_modules + 1)]

    def feature_points(self) -> list[str]:
        """``IMDB{k}.c5``: its input is block ``k``'s attention-weighted distilled features."""
        return [f"IMDB{k}.c5" for k in range(1, self.num_modules + 1)]


def quant_rule(model: SRModel) -> tuple[str, ...]:
    """Every IMDB conv, the fusion conv and ``LR_conv``; ``fea_conv``, the CCA convs and the upsampler stay FP."""
    return ("IMDB*.c1", "IMDB*.c2", "IMDB*.c3", "IMDB*.c4", "IMDB*.c5", "c.0", "LR_conv")


def detect(sd: StateDict) -> Hparams | None:
    """Official ``Zheng222/IMDN`` keys (``IMDB1.c1``, ``fea_conv``, ``upsampler.0``)."""
    if "IMDB1.c1.weight" not in sd:
        return None
    return {
        "upscale": shuffle_scale(sd["upsampler.0.weight"].shape[0], 3),
        "num_feat": sd["fea_conv.weight"].shape[0],
        "num_modules": len(key_indices(sd, r"IMDB(\d+)\.c1\.weight")),
        "learnable_shortcut": "IMDB1.learnable_shortcut" in sd,
    }


SPEC = ArchSpec("imdn", IMDN, "IMDN (Hui et al. 2019), 64 ch, 6 IMDBs", detect=detect, quant_rule=quant_rule,
                pretrained="IMDN_x{2,3,4}.pth from github.com/Zheng222/IMDN (checkpoints/; $QUANTSR_DATA/weights holds them)")

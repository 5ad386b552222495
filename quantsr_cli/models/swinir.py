"""Lightweight SwinIR (SwinIR-S; Liang et al. 2021), key-compatible with the official release.

Defaults build ``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{2,3,4}.pth``: embed_dim 60, 4 RSTBs of 6 Swin
blocks, 6 heads, window 8, mlp_ratio 2, ``upsampler='pixelshuffledirect'``, ``resi_connection='1conv'``,
``img_range=1`` with the DIV2K mean shift. ``depths``/``num_heads`` are configurable (QuantSR+-T uses
8 RSTBs). x4 has 929,628 parameters (897,228 without the 24 relative-position bias tables).

Differences from the official module, none of which changes the outputs:

* Runs on any input size: the input is reflect-padded to a multiple of the window size (replicate
  padding when the input is smaller than the pad) and the output cropped back. The shifted-window
  attention mask is computed for the actual (padded) size and cached; it is not a state-dict entry.
  Official checkpoints carry ``*.attn_mask`` buffers built for ``img_size=64``; they are accepted and
  dropped on load (``derived_keys``), so ``load_state_dict(official, strict=True)`` works and this
  model's own state dict has the official keys minus those 12 masks.
* ``WindowAttention`` has four ``nn.Identity`` activation points, ``q_act``, ``k_act``, ``v_act``
  (applied to q, k, v before scaling / matmul) and ``attn_act`` (softmax output before ``@ v``).
  Built with ``share_qv_quantizer=True`` it has no ``v_act``: v goes through ``q_act``, so once
  quantized q and v share one quantizer (one step, initialised and signed on q, the first call). That
  is what the released QuantSR+ ``q_swinir_arch.py`` runs (``v = self.q_actq(v)``; its ``v_actq`` is
  created but never called). The default keeps a separate v quantizer, as the release's module list
  intends; the two differ only once quantized (on a 2-RSTB QuantSR-T net by up to 0.26 at W2A2 and
  0.12 at W4A4 in the output; with sharing the net is bit-exact with the release).
* Stochastic depth: each Swin block has a ``drop_path`` (:class:`~quantsr_cli.models.common.DropPath`)
  on its attention and MLP branches, at rate 0 (identity) unless :meth:`SwinIR.set_drop_path` sets
  it for training; it never acts in eval mode and holds no state, so it is not a hyperparameter.
* Each RSTB (``layers.i``) has ``learnable_shortcut`` on its identity path (QuantSR+-T): a
  non-persistent buffer fixed at 1 by default (official keys), a trainable parameter
  ``layers.i.learnable_shortcut`` when built with ``learnable_shortcut=True``. A skipped RSTB returns
  ``x * learnable_shortcut``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantsr_cli.errors import ConfigError
from quantsr_cli.models.common import (
    MAX_BLOCKS,
    MAX_SMALL,
    MAX_WIDTH,
    DIV2K_RGB_MEAN,
    DropPath,
    SRModel,
    check_bool,
    check_float,
    check_int,
    check_int_list,
    check_probability,
    check_scale,
    init_shortcut,
)
from quantsr_cli.models.spec import ArchSpec, DepthRule, Hparams, LayoutNotSupported, StateDict, key_indices, shuffle_scale
from quantsr_cli.models.windows import relative_position_index, shifted_window_mask, window_partition, window_reverse

IMG_RANGE = 1.0


class WindowAttention(nn.Module):
    """Window multi-head self-attention with relative position bias.

    Input ``(B*nW, N, C)`` tokens of one window (``N = ws²``) and an optional mask ``(nW, N, N)``.
    With ``share_qv_quantizer`` there is no ``v_act`` and v goes through ``q_act`` (module docstring).
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, share_qv_quantizer: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.share_qv_quantizer = share_qv_quantizer
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.q_act = nn.Identity()
        self.k_act = nn.Identity()
        if not share_qv_quantizer:
            self.v_act = nn.Identity()
        self.attn_act = nn.Identity()
        self.softmax = nn.Softmax(dim=-1)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b_, n, c = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_act(qkv[0]), self.k_act(qkv[1])  # q first: a shared quantizer initialises on q
        v = self.q_act(qkv[2]) if self.share_qv_quantizer else self.v_act(qkv[2])
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_act(self.softmax(attn))
        return self.proj((attn @ v).transpose(1, 2).reshape(b_, n, c))


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` on ``(..., C)`` tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin transformer block (pre-norm attention + MLP, each branch through ``drop_path``) on
    ``(B, H*W, C)`` tokens."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float, share_qv: bool
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, share_qv)
        self.drop_path = DropPath(0.0)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        state_dict.pop(prefix + "attn_mask", None)  # official img_size-bound mask; recomputed per input
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, x_size: tuple[int, int], mask: Tensor | None) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws = self.window_size
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws).reshape(-1, ws * ws, c), mask if self.shift else None)
        y = window_reverse(y.view(-1, ws, ws, c), ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockGroup(nn.Module):
    """The official ``BasicLayer`` (``residual_group``): a sequence of Swin blocks, even ones unshifted."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, share_qv: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio, share_qv)
            for j in range(depth)
        )

    def forward(self, x: Tensor, x_size: tuple[int, int], mask: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, x_size, mask)
        return x


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H*W, C)`` tokens, optionally layer-normed (patch size 1)."""

    def __init__(self, dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class PatchUnEmbed(nn.Module):
    """``(B, H*W, C)`` tokens -> ``(B, C, H, W)``."""

    def forward(self, x: Tensor, x_size: tuple[int, int]) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], -1, x_size[0], x_size[1])


class RSTB(nn.Module):
    """Residual Swin transformer block: ``ls * x + embed(conv3x3(unembed(blocks(x))))`` on tokens."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, learnable_shortcut: bool,
        share_qv: bool,
    ) -> None:
        super().__init__()
        self.residual_group = BlockGroup(dim, depth, num_heads, window_size, mlp_ratio, share_qv)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim, norm=False)
        self.patch_unembed = PatchUnEmbed()
        init_shortcut(self, learnable_shortcut)

    def forward(self, x: Tensor, x_size: tuple[int, int], mask: Tensor | None) -> Tensor:
        if self.skip:
            return x * self.learnable_shortcut
        out = self.patch_embed(self.conv(self.patch_unembed(self.residual_group(x, x_size, mask), x_size)))
        return x * self.learnable_shortcut + out


class SwinIR(SRModel):
    """Lightweight SwinIR with the one-step pixel-shuffle upsampler.

    Args:
        upscale: 2, 3 or 4.
        embed_dim: token channels (60).
        depths: Swin blocks per RSTB (``[6, 6, 6, 6]``); its length is the number of RSTBs.
        num_heads: heads per RSTB (same length as ``depths``; each divides ``embed_dim``).
        window_size: attention window side (8).
        mlp_ratio: MLP hidden width / ``embed_dim`` (2).
        learnable_shortcut: see the module docstring (default False: official keys).
        share_qv_quantizer: quantize attention v with q's quantizer, as the released QuantSR code
            does (default False: v has its own); see the module docstring. Drops the ``v_act``
            activation point from ``quant_patterns``; the FP forward and the state dict are unchanged.

    Input ``(N, 3, H, W)`` RGB in ``[0, 1]``, any ``H, W >= 1``; output ``(N, 3, sH, sW)`` in ``[0, 1]``,
    unclamped.
    """

    arch = "swinir-s"
    derived_keys = ("layers.*.residual_group.blocks.*.attn_mask",)
    qk_points = ("layers.*.residual_group.blocks.*.attn.q_act",)
    av_points = ("layers.*.residual_group.blocks.*.attn.attn_act",)

    def __init__(
        self,
        upscale: int = 4,
        embed_dim: int = 60,
        depths: list[int] | tuple[int, ...] = (6, 6, 6, 6),
        num_heads: list[int] | tuple[int, ...] = (6, 6, 6, 6),
        window_size: int = 8,
        mlp_ratio: float = 2.0,
        learnable_shortcut: bool = False,
        share_qv_quantizer: bool = False,
    ) -> None:
        upscale = check_scale(upscale)
        embed_dim = check_int("embed_dim", embed_dim, maximum=MAX_WIDTH)
        depths_l = check_int_list("depths", depths, maximum=MAX_SMALL)
        heads_l = check_int_list("num_heads", num_heads, maximum=MAX_SMALL)
        window_size = check_int("window_size", window_size, minimum=2, multiple_of=2, maximum=MAX_SMALL)
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, maximum=16.0)
        learnable_shortcut = check_bool("learnable_shortcut", learnable_shortcut)
        share_qv = check_bool("share_qv_quantizer", share_qv_quantizer)
        if sum(depths_l) > MAX_BLOCKS:
            raise ConfigError(f"depths={depths_l} add up to more than {MAX_BLOCKS} Swin blocks")
        if len(depths_l) != len(heads_l):
            raise ConfigError(f"depths ({len(depths_l)} entries) and num_heads ({len(heads_l)}) must have equal length")
        for heads in heads_l:
            if embed_dim % heads:
                raise ConfigError(f"embed_dim={embed_dim} is not divisible by num_heads={heads}")
        super().__init__(
            {
                "upscale": upscale,
                "embed_dim": embed_dim,
                "depths": depths_l,
                "num_heads": heads_l,
                "window_size": window_size,
                "mlp_ratio": mlp_ratio,
                "learnable_shortcut": learnable_shortcut,
                "share_qv_quantizer": share_qv,
            }
        )
        self.window_size = window_size
        self.register_buffer("mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(3, embed_dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(embed_dim, norm=True)
        self.patch_unembed = PatchUnEmbed()
        self.layers = nn.ModuleList(
            RSTB(embed_dim, d, h, window_size, mlp_ratio, learnable_shortcut, share_qv)
            for d, h in zip(depths_l, heads_l)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self.upsample = nn.Sequential(nn.Conv2d(embed_dim, 3 * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale))
        self._masks: dict[tuple[int, int, str, torch.dtype], Tensor] = {}
        self.apply(_init_weights)

    def _mask(self, h: int, w: int, ref: Tensor) -> Tensor:
        key = (h, w, str(ref.device), ref.dtype)
        if key not in self._masks:
            if len(self._masks) >= 8:
                self._masks.clear()
            ws = self.window_size
            self._masks[key] = shifted_window_mask(h, w, ws, ws // 2, ref.device).to(ref.dtype)
        return self._masks[key]

    def forward_features(self, x: Tensor) -> Tensor:
        """Deep features ``(N, C, H, W)`` -> ``(N, C, H, W)``; ``H, W`` multiples of the window size."""
        x_size = (x.shape[2], x.shape[3])
        mask = self._mask(x_size[0], x_size[1], x)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, x_size, mask)
        return self.patch_unembed(self.norm(x), x_size)

    def forward(self, x: Tensor) -> Tensor:
        """Upscale ``x`` ``(N, 3, H, W)`` in ``[0, 1]`` to ``(N, 3, sH, sW)``."""
        h, w = x.shape[2], x.shape[3]
        ws = self.window_size
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        mean = self.mean.to(x.dtype)
        feat = self.conv_first((x - mean) * IMG_RANGE)
        out = self.upsample(self.conv_after_body(self.forward_features(feat)) + feat)
        out = out / IMG_RANGE + mean
        return out[:, :, : h * self.upscale, : w * self.upscale]

    def block_names(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.layers))]

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for training, with the official SwinIR rule (``drop_path_rate``; the released
        QuantSR+-T trains with 0.1): over all ``n = sum(depths)`` Swin blocks in order, block ``j`` drops
        its attention and MLP branches with probability ``torch.linspace(0, rate, n)[j]`` (the first
        never, the last with ``rate``). ``rate = 0`` turns it off. Acts in training mode only.
        """
        rate = check_probability("drop_path_rate", rate)
        blocks = [blk for layer in self.layers for blk in layer.residual_group.blocks]
        for blk, p in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
            blk.drop_path.drop_prob = float(p)

    def feature_points(self) -> list[str]:
        """``layers.i.patch_embed``: its input is RSTB ``i``'s conv output before the residual add."""
        return [f"layers.{i}.patch_embed" for i in range(len(self.layers))]


def _init_weights(module: nn.Module) -> None:
    """Official SwinIR init: truncated-normal(0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


_QUANTIZED = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn.q_act", "attn.k_act", "attn.v_act", "attn.attn_act")


def quant_rule(model: SRModel) -> tuple[str, ...]:
    """QuantSR(+)-T: every Swin block's linears and attention operands (q, k, v, softmax output) and each
    RSTB's conv; ``conv_first``, ``conv_after_body`` and the upsampler stay FP. With
    ``share_qv_quantizer`` there is no ``v_act`` point (v goes through ``q_act``)."""
    share = bool(model.hparams.get("share_qv_quantizer"))
    blocks = [f"layers.*.residual_group.blocks.*.{n}" for n in _QUANTIZED if not (share and n == "attn.v_act")]
    return (*blocks[:4], "layers.*.conv", *blocks[4:])


def detect(sd: StateDict) -> Hparams | None:
    """Official SwinIR keys (``layers.i.residual_group.blocks.j.attn.qkv``), lightweight variant only."""
    if "layers.0.residual_group.blocks.0.attn.qkv.weight" not in sd:
        return None
    if "conv_before_upsample.0.weight" in sd or "upsample.0.weight" not in sd:
        raise LayoutNotSupported("only lightweight SwinIR (upsampler 'pixelshuffledirect') is supported")
    embed_dim = sd["conv_first.weight"].shape[0]
    depths, heads = [], []
    for i in key_indices(sd, r"layers\.(\d+)\.conv\.weight"):
        depths.append(len(key_indices(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.attn\.qkv\.weight")))
        heads.append(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1])
    table_rows = sd["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape[0]
    side = math.isqrt(table_rows)
    if side * side != table_rows or side % 2 == 0:
        raise ValueError(f"relative position table with {table_rows} rows")
    return {
        "upscale": shuffle_scale(sd["upsample.0.weight"].shape[0], 3),
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": heads,
        "window_size": (side + 1) // 2,
        "mlp_ratio": sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        "learnable_shortcut": "layers.0.learnable_shortcut" in sd,
        "share_qv_quantizer": False,  # not visible in weights; a quantization option chosen by the user
    }


DEPTH = DepthRule(
    count=lambda hp: len(hp["depths"]),
    resize=lambda n: {"depths": [6] * n, "num_heads": [6] * n},  # n RSTBs of SwinIR-S's shape
    keep=lambda hp, kept: {"depths": [hp["depths"][i] for i in kept], "num_heads": [hp["num_heads"][i] for i in kept]},
)
"""Blocks are RSTBs (``layers.i``)."""

SPEC = ArchSpec("swinir-s", SwinIR, "lightweight SwinIR (SwinIR-S), 60 ch, 4x6 Swin blocks, window 8",
                detect=detect, quant_rule=quant_rule, depth=DEPTH,
                pretrained="002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{2,3,4}.pth from "
                           "github.com/JingyunLiang/SwinIR/releases (model_zoo v0.0)")

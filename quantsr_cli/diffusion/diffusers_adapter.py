"""OSEDiff on ``diffusers`` (optional dependency, extra ``diffusion``) feeding the same QArtSR engine.

:class:`OSEDiffAdapter` wraps a ``UNet2DConditionModel`` and an ``AutoencoderKL`` into the one-step SR
contract of :mod:`quantsr_cli.diffusion` (LR in [0, 1] → SR, ``rpq_modules()``, ``quant_patterns``,
``keep_patterns``, ``latents()``...). OSEDiff's forward, as in its released test code: ``z_L =
vae.encode(2*bicubic_up(LR) - 1).latent_dist * sf`` (we take the distribution's mode, not a sample, so
runs are deterministic), ``eps = unet(z_L, 999, empty-prompt embedding)``, ``z_H`` by the x0 update
(SD scaled-linear schedule), ``SR = (vae.decode(z_H / sf) + 1) / 2``. PassionSR drops the text encoder
and uses a precomputed empty-prompt embedding, which the caller supplies here (``(1, 77, C)``).

Every diffusers ``Attention`` gets ``nn.Identity`` activation points ``q_act/k_act/v_act/attn_act`` and a
processor that calls them, so q, k, v and the softmax output are quantized like in PassionSR. OSEDiff's
LoRA (peft ``lora_A/lora_B`` keys from its ``osediff.pkl``) is merged into the weights by
:func:`merge_peft_lora`; no ``peft`` import is needed. Weights are never downloaded
(``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models.onestep import OneStepSRMixin

ARCH = "osediff"
_POINTS = ("q_act", "k_act", "v_act", "attn_act")


def _diffusers():
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigError("the OSEDiff adapter needs diffusers: pip install 'quantsr[diffusion]'") from exc
    return diffusers


class QuantAttnProcessor:
    """diffusers attention processor (classic bmm path) that routes q, k, v and the softmax output
    through the Attention module's ``q_act/k_act/v_act/attn_act`` points. Shapes: ``hidden_states``
    ``(N, L, C)`` or ``(N, C, H, W)``; returns the same shape."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: object,
                 **kwargs: object) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            n, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(n, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.q_act(attn.head_to_batch_dim(attn.to_q(hidden_states)))
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.k_act(attn.head_to_batch_dim(attn.to_k(encoder_hidden_states)))
        value = attn.v_act(attn.head_to_batch_dim(attn.to_v(encoder_hidden_states)))
        probs = attn.attn_act(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(n, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def add_attention_points(module: nn.Module) -> int:
    """Give every diffusers ``Attention`` in ``module`` the four activation points and the
    :class:`QuantAttnProcessor`. Returns how many attention modules were changed."""
    attention_cls = _diffusers().models.attention_processor.Attention
    count = 0
    for sub in module.modules():
        if isinstance(sub, attention_cls):
            for p in _POINTS:
                if not hasattr(sub, p):
                    setattr(sub, p, nn.Identity())
            sub.set_processor(QuantAttnProcessor())
            count += 1
    return count


@torch.no_grad()
def merge_peft_lora(module: nn.Module, state_dict: dict[str, torch.Tensor], scaling: float) -> list[str]:
    """Merge peft-format LoRA factors into ``module``'s plain weights, in place.

    ``<path>.lora_A.<adapter>.weight`` / ``<path>.lora_B.<adapter>.weight`` add
    ``scaling * B @ A`` (conv factors flattened) to ``<path>.weight``; non-LoRA entries (e.g. OSEDiff's
    fully trained ``conv_in``, possibly as ``<path>.base_layer.weight``) are copied. ``scaling`` is
    peft's ``lora_alpha / r`` (OSEDiff: default alpha 8 / rank 4 = 2).

    Returns:
        the weight names that changed.
    Raises:
        CheckpointError: a key has no matching module/parameter or a shape does not fit.
    """
    params = dict(module.named_parameters())
    changed = []
    for key, a in state_dict.items():
        if ".lora_B." in key:
            continue
        if ".lora_A." in key:
            base, rest = key.split(".lora_A.", 1)
            b_key = f"{base}.lora_B.{rest}"
            w_name = base.replace(".base_layer", "") + ".weight"
            if b_key not in state_dict or w_name not in params:
                raise CheckpointError(f"LoRA key {key} has no lora_B partner or no target {w_name}")
            w = params[w_name]
            delta = state_dict[b_key].float().flatten(1) @ a.float().flatten(1)
            if delta.numel() != w.numel():
                raise CheckpointError(f"LoRA {base}: delta {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
            w.add_(scaling * delta.reshape(w.shape).to(w.dtype))
            changed.append(w_name)
            continue
        name = key.replace(".base_layer", "")
        if name not in params or params[name].shape != a.shape:
            raise CheckpointError(f"entry {key} does not fit the model")
        params[name].copy_(a)
        changed.append(name)
    return changed


def merge_osediff_lora(unet: nn.Module, vae: nn.Module, ckpt: dict[str, object], lora_alpha: float = 8.0) -> list[str]:
    """Merge an OSEDiff checkpoint dict (``state_dict_unet``, ``rank_unet``, ``state_dict_vae``,
    ``rank_vae``) into plain diffusers modules. peft's default ``lora_alpha`` is 8."""
    try:
        changed = merge_peft_lora(unet, ckpt["state_dict_unet"], lora_alpha / float(ckpt["rank_unet"]))
        changed += merge_peft_lora(vae, ckpt["state_dict_vae"], lora_alpha / float(ckpt["rank_vae"]))
    except KeyError as exc:
        raise CheckpointError(f"OSEDiff checkpoint lacks {exc}") from exc
    return changed


class OSEDiffAdapter(OneStepSRMixin, nn.Module):
    """OSEDiff one-step SR over diffusers modules: LR ``(N, 3, H, W)`` in [0, 1] → SR ``(N, 3, sH, sW)``."""

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor, timestep: int = 999,
                 upscale: int = 4) -> None:
        super().__init__()
        self.unet, self.vae = unet, vae
        if prompt_embeds.dim() == 2:
            prompt_embeds = prompt_embeds[None]
        self.register_buffer("prompt_embeds", prompt_embeds.float().clone())
        self.upscale, self.timestep = upscale, int(timestep)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.arch = ARCH
        self.hparams = {"upscale": upscale, "timestep": int(timestep)}
        add_attention_points(self)
        vae_f = 2 ** (len(vae.config.block_out_channels) - 1)
        unet_f = 2 ** (len(unet.config.block_out_channels) - 1)
        self.size_multiple = max(1, -(-vae_f * unet_f // upscale))
        self.quant_patterns: tuple[str, ...] = ("unet.*", "vae.*")
        self.keep_patterns: tuple[str, ...] = ("unet.time_embedding.linear_1", "unet.conv_out", "vae.quant_conv",
                                               "vae.post_quant_conv", "vae.encoder.conv_out", "vae.decoder.conv_out")
        self.lora_patterns: tuple[str, ...] = ("unet.*",)
        self.denoiser_prefix = "unet"

    def set_timestep(self, t: int) -> None:
        self.timestep = int(t)
        self.hparams["timestep"] = int(t)

    def rpq_modules(self) -> list[str | tuple[str, ...]]:
        """``vae.encoder(+quant_conv)``, UNet input, each down block, mid, each up block, UNet output,
        ``(post_quant_conv+)vae.decoder`` — in execution order, only parts that exist."""
        def have(*names: str) -> tuple[str, ...]:
            return tuple(n for n in names if self._has(n))
        chain: list[str | tuple[str, ...]] = [have("vae.encoder", "vae.quant_conv"),
                                               have("unet.time_embedding", "unet.conv_in")]
        chain += [f"unet.down_blocks.{i}" for i in range(len(self.unet.down_blocks))]
        chain += ["unet.mid_block"] if self.unet.mid_block is not None else []
        chain += [f"unet.up_blocks.{i}" for i in range(len(self.unet.up_blocks))]
        chain += [have("unet.conv_out"), have("vae.post_quant_conv", "vae.decoder")]
        return [c for c in chain if c]

    def _has(self, name: str) -> bool:
        try:
            return self.get_submodule(name) is not None
        except AttributeError:
            return False

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(lr, scale_factor=float(self.upscale), mode="bicubic", align_corners=False)
        return self.vae.encode(x.clamp(0, 1) * 2 - 1).latent_dist.mode() * self.scaling_factor

    def denoise(self, z_l: torch.Tensor) -> torch.Tensor:
        t = torch.full((z_l.shape[0],), self.timestep, device=z_l.device, dtype=torch.long)
        ctx = self.prompt_embeds.expand(z_l.shape[0], -1, -1)
        return self.unet(z_l, t, encoder_hidden_states=ctx).sample

    def decode(self, z_h: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(z_h / self.scaling_factor).sample + 1) * 0.5



def _load_prompt(prompt: torch.Tensor | str | Path | None, dim: int) -> torch.Tensor:
    if prompt is None:
        raise ConfigError("OSEDiff needs the empty-prompt embedding (1, 77, %d); pass prompt_embeds" % dim)
    if isinstance(prompt, torch.Tensor):
        return prompt
    path = Path(prompt)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read the prompt embedding ({exc})", path) from None
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError("the prompt-embedding file does not hold a tensor", path)
    return obj


def build_osediff(sd_path: str | Path, osediff_path: str | Path | None, prompt_embeds: torch.Tensor | str | Path,
                  timestep: int = 999, upscale: int = 4, lora_alpha: float = 8.0) -> OSEDiffAdapter:
    """Build OSEDiff from a local SD-2.1-base folder (``unet/``, ``vae/``), merge OSEDiff's LoRA
    (``osediff.pkl``, read with ``weights_only=True``) and wrap it. Nothing is downloaded.

    ``prompt_embeds``: the empty-prompt CLIP embedding ``(1, 77, 1024)`` as a tensor or a ``.pt`` file
    (PassionSR ships ``empty_context_embedding.pt``)."""
    d = _diffusers()
    root = Path(sd_path)
    if not root.is_dir():
        raise CheckpointError("Stable Diffusion folder not found", root)
    unet = d.UNet2DConditionModel.from_pretrained(str(root), subfolder="unet", local_files_only=True)
    vae = d.AutoencoderKL.from_pretrained(str(root), subfolder="vae", local_files_only=True)
    if osediff_path is not None:
        try:
            ckpt = torch.load(Path(osediff_path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"cannot read the OSEDiff checkpoint ({exc})", osediff_path) from None
        if not isinstance(ckpt, dict):
            raise CheckpointError("the OSEDiff checkpoint is not a dict", osediff_path)
        merge_osediff_lora(unet, vae, ckpt, lora_alpha)
    prompt = _load_prompt(prompt_embeds, int(unet.config.cross_attention_dim))
    return OSEDiffAdapter(unet.eval(), vae.eval(), prompt, timestep, upscale).eval()

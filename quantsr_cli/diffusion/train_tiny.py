"""Training of the FP ``osd-sr-tiny`` model on CPU, with checkpoints and resume.

Two phases in one run (one Adam optimizer, cosine learning rate over all steps):

1. ``ae_iters`` autoencoder warm-up: ``L1(decoder(encoder(HR)), HR)`` trains the VAE only, so that the
   latent space means something before the one-step UNet is put in between (OSEDiff starts from the
   pretrained SD VAE instead).
2. ``iters`` SR steps: ``L1(SR, HR) + perceptual_weight * ssim+grad(SR, HR)`` through the whole
   one-step pipeline at the fixed timestep (the decoder can be frozen, as in OSEDiff).

Data: random aligned patches of T91 + BSD200 (HR ``patch_size``², LR by MATLAB-style bicubic ×1/4).
Every step draws its batch from ``numpy.random.default_rng([seed, step])`` so a resumed run sees exactly
the batches an uninterrupted run would. Files in ``out_dir``: ``last_state.safetensors`` (model, optimizer
and step in one atomically written file, no pickle), rewritten every ``save_every`` steps;
``train_log.jsonl``; and the final ``osd_sr_tiny_x<s>.safetensors``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.data import TrainDataset
from quantsr_cli.diffusion.ckpt import save_model
from quantsr_cli.diffusion.losses import SSIMGradLoss
from quantsr_cli.diffusion.stages import sample_patches
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.fileio import dumps
from quantsr_cli.models import build_model, load_weights
from quantsr_cli.models.osd_tiny import ARCH
from quantsr_cli.packing.io import read_file, save_file
from quantsr_cli.packing.state import flatten_optimizer, unflatten_optimizer


@dataclass(frozen=True)
class TinyTrainOptions:
    """Options of :func:`train_osd_tiny` (steps are optimizer steps, sizes in HR pixels)."""

    iters: int = 2500
    ae_iters: int = 400
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 5e-4
    eta_min: float = 1e-6
    perceptual_weight: float = 0.05
    freeze_decoder: bool = False
    save_every: int = 100
    log_every: int = 25
    seed: int = 0
    threads: int = 1
    hparams: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.iters < 0 or self.ae_iters < 0 or self.iters + self.ae_iters < 1:
            raise ConfigError("iters + ae_iters must be at least 1 (and neither negative)")
        if self.patch_size % 16:
            raise ConfigError(f"patch_size={self.patch_size} must be a multiple of 16")
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("batch_size must be >= 1 and lr > 0")


def _save_state(model: nn.Module, opt: torch.optim.Optimizer, step: int, path: Path) -> None:
    """Model + optimizer + step in one safetensors file (atomic, no pickle)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_info = flatten_optimizer(opt.state_dict())
    tensors.update(opt_tensors)
    meta = {"kind": "diffusion-train-state", "arch": str(model.arch), "hparams": json.dumps(model.hparams),
            "step": str(step), "optimizer": json.dumps(opt_info)}
    save_file(tensors, meta, path)


def _load_state(path: Path) -> tuple[nn.Module, dict[str, object]]:
    """The model (strict load, :func:`~quantsr_cli.models.load_weights`) and ``{step, optimizer}`` of a state file."""
    tensors, meta = read_file(path)
    try:
        model = build_model(meta.get("arch", ARCH), **json.loads(meta.get("hparams", "{}")))
        state = {"step": int(meta["step"]), "optimizer": unflatten_optimizer(tensors, json.loads(meta["optimizer"]))}
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"not a training state of osd-sr-tiny ({exc})", path) from None
    load_weights(model, {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}, path)
    return model, state


def _cosine(step: int, total: int, lr: float, eta_min: float) -> float:
    return eta_min + 0.5 * (lr - eta_min) * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_osd_tiny(out_dir: str | Path, train_dirs: Sequence[str | Path],
                   options: TinyTrainOptions = TinyTrainOptions(), *, resume: bool = True,
                   log: Callable[[dict[str, object]], None] | None = None) -> Path:
    """Train (or resume training) ``osd-sr-tiny`` and return the final checkpoint path.

    Args:
        out_dir: folder for checkpoints and the log (created).
        train_dirs: HR image folders, e.g. ``shared/data/train/T91`` and ``.../BSD200``.
        options: see :class:`TinyTrainOptions`; ``options.hparams`` go to the model builder.
        resume: continue from ``out_dir/last.*`` when present (its hparams win).
        log: called with a dict every ``log_every`` steps (default: print one line).

    Returns:
        ``out_dir / "osd_sr_tiny_x<upscale>.safetensors"``.
    """
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "last_state.safetensors"
    torch.manual_seed(options.seed)
    start = 0
    state = None
    if resume and state_path.is_file():
        model, state = _load_state(state_path)
        start = int(state["step"])
    else:
        model = build_model(ARCH, **options.hparams)
    model.train()
    scale = int(model.hparams["upscale"])
    total = options.ae_iters + options.iters
    final = out / f"osd_sr_tiny_x{scale}.safetensors"
    if start >= total:
        save_model(model.eval(), final, extra={"step": str(start)})
        return final
    data = TrainDataset(list(train_dirs), scale, patch_size=options.patch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=options.lr, betas=(0.9, 0.99))
    if state is not None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"optimizer state does not fit the model ({exc})", state_path) from exc
    perceptual = SSIMGradLoss()
    emit = log or (lambda rec: print(" ".join(f"{k}={v}" for k, v in rec.items()), flush=True))
    t0, running, count = time.time(), 0.0, 0
    for step in range(start, total):
        ae_phase = step < options.ae_iters
        model.vae.decoder.requires_grad_(ae_phase or not options.freeze_decoder)
        for group in opt.param_groups:
            group["lr"] = _cosine(step, total, options.lr, options.eta_min)
        lr_t, hr_t = sample_patches(data, options.batch_size, np.random.default_rng([options.seed, step]))
        if ae_phase:
            x = hr_t * 2 - 1
            loss = F.l1_loss(model.vae.decoder(model.vae.encoder(x)), x)
        else:
            sr = model(lr_t)
            loss = F.l1_loss(sr, hr_t) + options.perceptual_weight * perceptual(sr, hr_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        count += 1
        done = step + 1
        if done % options.log_every == 0 or done == total:
            rec = {"step": done, "phase": "ae" if ae_phase else "sr", "loss": round(running / count, 5),
                   "lr": f"{opt.param_groups[0]['lr']:.2e}", "sec_per_step": round((time.time() - t0) / count, 3)}
            with open(out / "train_log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(dumps(rec) + "\n")
            emit(rec)
            t0, running, count = time.time(), 0.0, 0
        if done % options.save_every == 0 or done == total:
            _save_state(model, opt, done, state_path)
    save_model(model.eval(), final, extra={"step": str(total)})
    return final

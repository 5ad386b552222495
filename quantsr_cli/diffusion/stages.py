"""Training stages of QArtSR: reversed per-module quantization (RPQ) and end-to-end training (ET).

RPQ (``order="reverse"``) walks the model's module chain from the output end to the input end. At the
stage of module ``k`` the modules ``k..N-1`` are quantized (``0..k-1`` stay FP, so module ``k`` sees
exactly its FP input) and the finetuning parameters of all of them train on::

    module_weight * ||M_k,q(x) - M_k,fp(x)||^2 / ||M_k,fp(x)||^2      (same FP input x, re-called)
  + image_weight  * (a1 * perceptual(I_q, I_fp) + a2 * ||I_q - I_fp||^2)

``order="forward"`` is the ablation: module ``k`` and all earlier modules are quantized and train.
ET trains every finetuning parameter end to end on the image loss alone (distillation to the FP output).
The FP reference ``model_fp`` is a separate frozen copy; only wrapper finetuning parameters are optimised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantsr_cli.data import TrainDataset
from quantsr_cli.diffusion.losses import image_loss, relative_mse
from quantsr_cli.diffusion.qmodel import assign_modules, quant_layers, set_quant_enabled
from quantsr_cli.errors import ConfigError

LogFn = Callable[[dict[str, object]], None]
_WEIGHT_ATTRS = ("lr_u", "lr_v", "lora_a", "lora_b")


@dataclass
class CalibData:
    """A fixed set of LR training patches (and optional HR targets) served in deterministic batches.

    Args:
        lr: ``(N, 3, h, w)`` in [0, 1]; h, w multiples of the model's ``size_multiple``.
        hr: ``(N, 3, s*h, s*w)`` in [0, 1] or None (only TRQ's GT retraining uses it).
        batch_size: samples per optimizer step.
        seed: seed of the per-epoch shuffles.
        device: where batches are sent (the model's device).
    """

    lr: torch.Tensor
    hr: torch.Tensor | None = None
    batch_size: int = 8
    seed: int = 0
    device: str | torch.device = "cpu"
    _perms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.lr.dim() != 4 or self.lr.shape[0] < 1:
            raise ConfigError("calibration data needs a non-empty (N, 3, h, w) LR tensor")
        if self.hr is not None and self.hr.shape[0] != self.lr.shape[0]:
            raise ConfigError("calibration LR and HR counts differ")
        self.batch_size = max(1, min(self.batch_size, self.lr.shape[0]))

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.lr.shape[0], generator=gen)
        return self._perms[epoch]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``step``-th training batch (shuffled per epoch, reproducible)."""
        n = self.lr.shape[0]
        g = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        idx = torch.stack([self._perm(int(i) // n)[int(i) % n] for i in g])
        hr = None if self.hr is None else self.hr[idx].to(self.device)
        return self.lr[idx].to(self.device), hr

    def calibration_batches(self, count: int) -> list[torch.Tensor]:
        """The first ``count`` LR batches in storage order (activation statistics)."""
        bs, n = self.batch_size, self.lr.shape[0]
        return [self.lr[i * bs % n: i * bs % n + bs].to(self.device) for i in range(max(1, count))]


def sample_patches(data: TrainDataset, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random aligned patches of ``data``'s in-memory HR/LR images (shared loader: MATLAB-bicubic LR, images
    smaller than the patch skipped), each with a random rot90 and flip.

    Draws from the numpy ``rng`` (image, offsets, rot90, flip, per patch), not the torch generator of
    :meth:`TrainDataset.sample_batch`: the patch sets, and so the committed QArtSR results, stay those of
    the diffusion engine's own sampler.

    Returns:
        ``lr (N, 3, p/s, p/s)``, ``hr (N, 3, p, p)`` float32 in [0, 1] (``p = data.patch_size``).
    """
    s = data.scale
    lp = data.patch_size // s
    lrs, hrs = [], []
    for _ in range(batch):
        i = int(rng.integers(len(data.hr)))
        lr_img, hr_img = data.lr[i].numpy(), data.hr[i].numpy()  # uint8 (3, h, w)
        y = int(rng.integers(lr_img.shape[1] - lp + 1))
        x = int(rng.integers(lr_img.shape[2] - lp + 1))
        lp_, hp = lr_img[:, y : y + lp, x : x + lp], hr_img[:, y * s : (y + lp) * s, x * s : (x + lp) * s]
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        lp_, hp = np.rot90(lp_, k, axes=(1, 2)), np.rot90(hp, k, axes=(1, 2))
        if flip:
            lp_, hp = lp_[:, :, ::-1], hp[:, :, ::-1]
        lrs.append(lp_)
        hrs.append(hp)
    return tuple(torch.from_numpy(np.ascontiguousarray(np.stack(p))).float().div(255.0) for p in (lrs, hrs))


def calibration_data(folders: Sequence[str | Path], patches: int, patch: int = 64, batch_size: int = 8,
                     seed: int = 0, scale: int = 4) -> CalibData:
    """``patches`` fixed HR/LR patches (HR side ``patch``) from the HR image ``folders``, seeded by ``seed``."""
    data = TrainDataset(list(folders), scale, patch_size=patch)
    lr, hr = sample_patches(data, patches, np.random.default_rng([seed, 12345]))
    return CalibData(lr, hr, batch_size=batch_size, seed=seed)


def rpq_schedule(num_modules: int, order: str = "reverse") -> list[tuple[int, list[int]]]:
    """Per RPQ stage: ``(module being quantized, indices of all quantized = trainable modules)``.

    ``reverse``: ``[(N-1, [N-1]), (N-2, [N-2, N-1]), ..., (0, [0..N-1])]``;
    ``forward``: ``[(0, [0]), (1, [0, 1]), ..., (N-1, [0..N-1])]``.
    """
    if order == "reverse":
        return [(k, list(range(k, num_modules))) for k in reversed(range(num_modules))]
    if order == "forward":
        return [(k, list(range(k + 1))) for k in range(num_modules)]
    raise ConfigError(f"order={order!r}; choose reverse or forward")


def make_optimizer(model: nn.Module, names: Iterable[str], lr: float, lr_weights: float) -> torch.optim.Adam:
    """Adam over the finetuning parameters of ``names``: quantizers/phi at ``lr``, low-rank/LoRA
    factors at ``lr_weights``."""
    layers = quant_layers(model)
    weights: list[nn.Parameter] = []
    quant: list[nn.Parameter] = []
    for name in names:
        layer = layers[name]
        w_ids = set()
        for attr in _WEIGHT_ATTRS:
            p = getattr(layer, attr, None)
            if p is not None:
                weights.append(p)
                w_ids.add(id(p))
        quant += [p for p in layer.finetune_parameters() if id(p) not in w_ids]
    groups = [g for g in ({"params": quant, "lr": lr}, {"params": weights, "lr": lr_weights}) if g["params"]]
    if not groups:
        raise ConfigError("no finetuning parameters to train")
    return torch.optim.Adam(groups, betas=(0.9, 0.999))


def _detach(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(o) for o in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_detach, obj))
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):  # diffusers BaseOutput
        return _tensors(obj.to_tuple())
    return []


def capture_calls(model: nn.Module, names: Iterable[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, list]]:
    """Run ``model(x)`` without gradients, recording ``(args, kwargs, output)`` of every call of the
    named submodules. Returns ``(model output, {name: [(args, kwargs, output), ...]})``."""
    calls: dict[str, list] = {n: [] for n in names}
    handles = []
    for name in calls:
        def hook(_m, args, kwargs, output, _name=name):
            calls[_name].append((_detach(args), _detach(kwargs), _detach(output)))
        handles.append(model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def _names(owned: list[list[str]], modules: Iterable[int]) -> list[str]:
    return [n for k in modules for n in owned[k]]


def run_rpq(model_q: nn.Module, model_fp: nn.Module, data: CalibData, *, iters: int, order: str = "reverse",
            lr: float = 1e-2, lr_weights: float = 1e-3, module_weight: float = 1.0, image_weight: float = 1.0,
            perceptual: nn.Module | None = None, a1: float = 1.0, a2: float = 20.0, log: LogFn | None = None,
            log_every: int = 25, step0: int = 0) -> list[dict[str, object]]:
    """Reversed (or forward) per-module quantization; ``iters`` optimizer steps split over the chain.

    Returns:
        one record per stage, in visiting order: ``module`` (chain element), ``index``, ``active``
        (chain indices quantized and trained), ``iters``, ``loss_first``, ``loss_last``.
    """
    chain = [(c,) if isinstance(c, str) else tuple(c) for c in model_q.rpq_modules()]
    owned = assign_modules(model_q, chain)
    schedule = rpq_schedule(len(chain), order)
    model_fp.eval().requires_grad_(False)
    model_q.eval()
    history: list[dict[str, object]] = []
    step = step0
    base, extra = divmod(max(iters, 0), len(chain))
    for pos, (k, active) in enumerate(schedule):
        names = _names(owned, active)
        active_set = set(names)
        set_quant_enabled(model_q, lambda n: n in active_set)
        n_it = base + (1 if pos < extra else 0)
        rec: dict[str, object] = {"module": "|".join(chain[k]), "index": k, "active": active, "iters": n_it}
        trainable = [n for n in names if any(p.requires_grad for p in quant_layers(model_q)[n].finetune_parameters())]
        if n_it == 0 or not trainable:
            history.append(rec)
            continue
        opt = make_optimizer(model_q, trainable, lr, lr_weights)
        t0 = time.time()
        for it in range(n_it):
            x, _ = data.batch(step)
            step += 1
            out_fp, calls = capture_calls(model_fp, chain[k], x)
            out_q = model_q(x)
            outs_q, outs_fp = [], []
            for name in chain[k]:
                sub = model_q.get_submodule(name)
                for args, kwargs, y_fp in calls[name]:
                    outs_q += _tensors(sub(*args, **kwargs))
                    outs_fp += _tensors(y_fp)
            l_mod = relative_mse(outs_q, outs_fp) if outs_q else out_q.new_zeros(())
            l_img = image_loss(out_q, out_fp, perceptual, a1, a2)
            loss = module_weight * l_mod + image_weight * l_img
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it == 0:
                rec["loss_first"] = round(loss.item(), 6)
            if log and ((it + 1) % log_every == 0 or it + 1 == n_it):
                log({"stage": f"rpq-{order}", "module": rec["module"], "it": it + 1, "of": n_it,
                     "module_loss": round(l_mod.item(), 6), "image_loss": round(l_img.item(), 6),
                     "sec_per_it": round((time.time() - t0) / (it + 1), 3)})
        rec["loss_last"] = round(loss.item(), 6)
        history.append(rec)
    set_quant_enabled(model_q, True)
    return history


def run_e2e(model_q: nn.Module, model_fp: nn.Module, data: CalibData, *, iters: int, lr: float = 1e-2,
            lr_weights: float = 1e-3, perceptual: nn.Module | None = None, a1: float = 1.0, a2: float = 20.0,
            log: LogFn | None = None, log_every: int = 25, step0: int = 0, stage: str = "et") -> dict[str, object]:
    """End-to-end training of all finetuning parameters on ``a1*perc + a2*MSE`` to the FP output
    (QArtSR's extended training; with ``a1=0`` and LSQ quantizers also the LSQ-QAT baseline).
    The learning rates follow a cosine decay to 1 % over ``iters``."""
    model_fp.eval().requires_grad_(False)
    model_q.eval()
    set_quant_enabled(model_q, True)
    rec: dict[str, object] = {"stage": stage, "iters": iters}
    if iters <= 0:
        return rec
    opt = make_optimizer(model_q, list(quant_layers(model_q)), lr, lr_weights)
    bases = [g["lr"] for g in opt.param_groups]
    t0 = time.time()
    for it in range(iters):
        f = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * it / iters))
        for g, b in zip(opt.param_groups, bases):
            g["lr"] = b * f
        x, _ = data.batch(step0 + it)
        with torch.no_grad():
            out_fp = model_fp(x)
        loss = image_loss(model_q(x), out_fp, perceptual, a1, a2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it == 0:
            rec["loss_first"] = round(loss.item(), 6)
        if log and ((it + 1) % log_every == 0 or it + 1 == iters):
            log({"stage": stage, "it": it + 1, "of": iters, "loss": round(loss.item(), 6),
                 "sec_per_it": round((time.time() - t0) / (it + 1), 3)})
    rec["loss_last"] = round(loss.item(), 6)
    return rec

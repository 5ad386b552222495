"""The one training loop of quantsr (``quantize``, ``slim``, ``distill`` and DQA all run through it).

Per iteration: a deterministic batch ``(lr, hr)`` for that iteration (so resuming reproduces the same
data), the L1 loss (mean over DQA depth variants when enabled) plus hook losses (SFD), one Adam step
with the learning rate of that iteration. Every ``save_every`` iterations the full state is written
atomically; every ``val_every`` iterations the model is validated (Y-PSNR) and the best kept.
With ``ema_decay > 0`` an exponential moving average of the weights (BasicSR's ``net_g_ema``:
``θ_ema ← d·θ_ema + (1 − d)·θ`` after every step, buffers copied) is what is validated and written;
the trained model's own PSNR is logged beside it (``psnr_raw``).
Under ``torchrun`` the model is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU), every
rank draws its own batches and only rank 0 validates and writes files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.config import TrainConfig
from quantsr_cli.engine import checkpoint as ckpt
from quantsr_cli.fileio import dumps

EventFn = Callable[[dict[str, Any]], None]

LOGGED = ("train", "val", "save", "log", "resume", "slim", "done")
"""Event kinds written to ``train_log.jsonl`` (one strict JSON object per line). ``step`` (every iteration)
and ``phase`` events only reach the progress display."""


class Rate:
    """Iterations per second over the last ``window`` iterations of this process (resumed runs count
    from where they resumed), and the time left at that rate. ``clock`` is injectable for tests."""

    def __init__(self, start_iter: int, clock: Callable[[], float], window: int = 50) -> None:
        self.clock = clock
        self.samples: deque[tuple[int, float]] = deque([(start_iter, clock())], maxlen=window + 1)

    def tick(self, iteration: int) -> None:
        self.samples.append((iteration, self.clock()))

    @property
    def it_s(self) -> float | None:
        """None until two samples exist (the first iteration's rate is then known)."""
        (i0, t0), (i1, t1) = self.samples[0], self.samples[-1]
        return (i1 - i0) / (t1 - t0) if i1 > i0 and t1 > t0 else None

    def eta_s(self, iteration: int, total: int) -> float | None:
        rate = self.it_s
        return (total - iteration) / rate if rate else None


class TrainHook(Protocol):
    """Optional extension points of the loop (QSA slimming, SFD distillation)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def before_step(self, trainer: Trainer, iteration: int) -> None: ...

    def after_validation(self, trainer: Trainer, iteration: int, psnr: float) -> None: ...

    def extra_loss(self, trainer: Trainer, lr: torch.Tensor, hr: torch.Tensor, sr: torch.Tensor) -> torch.Tensor | None: ...


def lr_at(cfg: TrainConfig, iteration: int) -> float:
    """Learning rate for the step ``iteration`` (0-based) under ``cfg.scheduler``."""
    if cfg.scheduler == "constant":
        return cfg.lr
    if cfg.scheduler == "multistep":
        drops = sum(1 for m in cfg.milestones if iteration >= m)
        return cfg.lr * cfg.gamma**drops
    progress = min(iteration / max(cfg.iters, 1), 1.0)
    return cfg.eta_min + 0.5 * (cfg.lr - cfg.eta_min) * (1 + math.cos(math.pi * progress))


@dataclass
class Trainer:
    """Runs ``cfg.iters`` optimisation steps of ``model`` and keeps ``run_dir`` resumable.

    Args:
        model: the (quantized) network, (N,3,h,w) in [0,1] -> (N,3,sh,sw).
        cfg: training options.
        run_dir: folder for checkpoints, logs and outputs.
        sample_batch: ``(iteration, batch_size) -> (lr, hr)`` deterministic in the iteration.
        validate: ``(model, iteration) -> PSNR (dB)`` on the validation set (``iteration`` None: a second
            model, e.g. the raw one beside the EMA, whose images are not saved), or None to skip validation.
        model_meta: safetensors metadata describing the model (arch, hparams, quant config).
        variants: DQA depth variants: callables that configure the model for one depth (None = one pass).
        hooks: slimming / distillation hooks.
        on_event: progress callback (dicts with an ``"event"`` key): ``phase`` (``training``,
            ``validating``), ``step`` every iteration (``iter``, ``iters``, ``loss``, ``it_s``, ``eta_s``),
            ``train`` every ``cfg.log_every`` (also ``lr``; ``loss`` is the mean since the last one),
            ``val``, ``save``, ``resume``, ``log``, ``done``.
        sinks: more event consumers on rank 0 (TensorBoard); a sink with ``close()`` is closed when
            :meth:`train` ends.
        clock: seconds, for it/s and the ETA.
    """

    model: nn.Module
    cfg: TrainConfig
    run_dir: Path
    sample_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    validate: Callable[[nn.Module, int | None], float] | None = None
    model_meta: dict[str, str] = field(default_factory=dict)
    variants: Sequence[Callable[[nn.Module], None]] = ()
    hooks: list[Any] = field(default_factory=list)
    on_event: EventFn | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sinks: Sequence[EventFn] = ()
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.iteration = 0
        self.best_psnr = -math.inf
        self.best_iter = -1
        self.history: list[dict[str, Any]] = []
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr, betas=self.cfg.betas
        )
        self.ema: nn.Module | None = None
        if self.cfg.ema_decay > 0:
            self.ema = copy.deepcopy(self.model).eval()
            self.ema.requires_grad_(False)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def eval_model(self) -> nn.Module:
        """The model that is validated and written: the EMA model when enabled, else the trained one."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        decay = self.cfg.ema_decay
        for p_ema, p in zip(self.ema.parameters(), self.model.parameters()):
            p_ema.mul_(decay).add_(p.detach(), alpha=1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # -- events -------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if event.get("event") in LOGGED:
            with open(self.run_dir / "train_log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(dumps(event) + "\n")
        for sink in self.sinks:
            sink(event)
        if self.on_event:
            self.on_event(event)

    # -- state --------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "best_psnr": self.best_psnr if math.isfinite(self.best_psnr) else None,
            "best_iter": self.best_iter,
            "history": self.history[-200:],
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def resume(self) -> bool:
        """Continue from the newest loadable state in ``run_dir``; False when there is none."""
        found = ckpt.load_latest_state(self.run_dir, on_skip=lambda m: self.emit({"event": "log", "message": m}))
        if found is None:
            return False
        path, tensors, meta = found
        # Hooks first: they may change the model's structure (frozen shortcuts, skipped blocks).
        state = json.loads(meta["trainer"])
        for hook, hstate in zip(self.hooks, state.get("hooks", [])):
            hook.load_state_dict(hstate)
        self.iteration, state = ckpt.restore_state(tensors, meta, self.model, self.optimizer, path, ema=self.ema)
        self.best_psnr = state["best_psnr"] if state.get("best_psnr") is not None else -math.inf
        self.best_iter = state.get("best_iter", -1)
        self.history = state.get("history", [])
        self.emit({"event": "resume", "iter": self.iteration, "path": str(path)})
        return True

    def save(self) -> None:
        if self.rank == 0:
            path = ckpt.save_state(
                self.run_dir, self.iteration, self.model, self.optimizer, self.trainer_state(), self.model_meta,
                ema=self.ema,
            )
            self.emit({"event": "save", "iter": self.iteration, "path": str(path)})
        self._barrier()

    # -- loop ---------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _loss(self, net: nn.Module, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        passes = list(self.variants) or [None]
        total = lr.new_zeros(())
        for configure in passes:
            if configure is not None:
                configure(self.model)
            sr = net(lr)
            loss = F.l1_loss(sr, hr)
            for hook in self.hooks:
                extra = hook.extra_loss(self, lr, hr, sr)
                if extra is not None:
                    loss = loss + extra
            total = total + loss / len(passes)
        if self.variants:
            self.variants[0](self.model)  # back to the full-depth variant
        return total

    def run_validation(self) -> float | None:
        if self.validate is None or self.rank != 0:
            return None
        self.emit({"event": "phase", "phase": "validating", "iter": self.iteration})
        self.model.eval()
        with torch.no_grad():
            psnr = float(self.validate(self.eval_model, self.iteration))
            raw = float(self.validate(self.model, None)) if self.ema is not None else None
        self.model.train()
        improved = psnr > self.best_psnr
        if improved:
            self.best_psnr, self.best_iter = psnr, self.iteration
        record: dict[str, Any] = {"iter": self.iteration, "psnr": psnr}
        if raw is not None:
            record["psnr_raw"] = raw
        self.history.append(record)
        self.emit({"event": "val", **record, "best": self.best_psnr, "improved": improved})
        return psnr

    def train(self, on_best: Callable[[Trainer], None] | None = None) -> None:
        """Run from ``self.iteration`` to ``cfg.iters``; ``on_best`` is called when validation improves."""
        try:
            self._train(on_best)
        finally:
            for sink in self.sinks:
                close = getattr(sink, "close", None)
                if callable(close):
                    close()

    def _train(self, on_best: Callable[[Trainer], None] | None) -> None:
        cfg = self.cfg
        net: nn.Module = self.model
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=True)
        self.model.train()
        self.emit({"event": "phase", "phase": "training", "iter": self.iteration, "iters": cfg.iters})
        rate = Rate(self.iteration, self.clock)
        window: list[float] = []  # losses since the last "train" record
        while self.iteration < cfg.iters:
            it = self.iteration
            for hook in self.hooks:
                hook.before_step(self, it)
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, it)
            lr_img, hr_img = self.sample_batch(it * self.world + self.rank, cfg.batch_size)
            lr_img, hr_img = lr_img.to(self.device), hr_img.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._loss(net, lr_img, hr_img)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at iteration {it}; lower --lr")
            loss.backward()
            self.optimizer.step()
            self._update_ema()
            self.iteration = it + 1
            rate.tick(self.iteration)
            window.append(loss.item())
            progress = {"iter": self.iteration, "iters": cfg.iters, "it_s": rate.it_s,
                        "eta_s": rate.eta_s(self.iteration, cfg.iters)}
            self.emit({"event": "step", **progress, "loss": window[-1]})
            if self.iteration % cfg.log_every == 0 or self.iteration == cfg.iters:
                self.emit({"event": "train", **progress, "loss": sum(window) / len(window), "lr": lr_at(cfg, it)})
                window.clear()
            if cfg.val_every > 0 and (self.iteration % cfg.val_every == 0 or self.iteration == cfg.iters):
                psnr = self.run_validation()
                if psnr is not None:
                    for hook in self.hooks:
                        hook.after_validation(self, self.iteration, psnr)
                    if self.best_iter == self.iteration and on_best is not None:
                        on_best(self)
            if self.iteration % cfg.save_every == 0 or self.iteration == cfg.iters:
                self.save()
        best = self.best_psnr if math.isfinite(self.best_psnr) else None
        self.emit({"event": "done", "iter": self.iteration, "best_psnr": best, "best_iter": self.best_iter})

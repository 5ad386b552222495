"""QuantSR+ QSA: remove residual blocks while training until ``target`` remain.

Follows the released QuantSR+ training loop (``Q2:basicsr/train.py:213-347``):

- the first removal happens at ``start_ratio x total_iters`` (0.2);
- the block removed is the still-active one whose learnable identity scalar is largest; its scalar is
  set to 1 and frozen and the block becomes an identity (``skip = True``);
- later removals happen at a validation when the PSNR has recovered to the value recorded at the
  previous removal, or once ``total_iters / num_blocks * 2`` iterations have passed since it.

Unlike the release (which can end with fewer removals than asked), blocks still pending at the last
iteration are removed then, so the written model always has exactly ``target`` blocks. The model file
then holds only the kept blocks (:func:`compact_state_dict`), renumbered in order.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from quantsr_cli.errors import ConfigError


class SlimHook:
    """Trainer hook that performs the QSA removals (see module docstring)."""

    def __init__(self, model: nn.Module, target: int, total_iters: int, start_ratio: float = 0.2) -> None:
        names = model.block_names()
        if not 1 <= target < len(names):
            raise ConfigError(f"--slim-to {target}: the model has {len(names)} blocks; choose 1..{len(names) - 1}")
        for name in names:
            if not isinstance(getattr(model.get_submodule(name), "learnable_shortcut", None), nn.Parameter):
                raise ConfigError(f"{model.arch}: block {name} has no trainable learnable_shortcut; cannot slim it")
        self.model = model
        self.names = names
        self.target = target
        self.total_iters = total_iters
        self.first_at = int(start_ratio * total_iters)
        self.max_wait = max(1, int(total_iters / len(names) * 2))
        self.removed: list[dict[str, Any]] = []

    # -- state ---------------------------------------------------------------------------------
    @property
    def need(self) -> int:
        return len(self.names) - self.target

    @property
    def done(self) -> bool:
        return len(self.removed) >= self.need

    def kept_indices(self) -> list[int]:
        gone = {r["index"] for r in self.removed}
        return [i for i in range(len(self.names)) if i not in gone]

    def state_dict(self) -> dict[str, Any]:
        return {"removed": self.removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.removed = list(state.get("removed", []))
        for record in self.removed:
            self._disable(record["index"])

    # -- mechanics -----------------------------------------------------------------------------
    def _disable(self, index: int) -> None:
        block = self.model.get_submodule(self.names[index])
        with torch.no_grad():
            block.learnable_shortcut.fill_(1.0)
        block.learnable_shortcut.requires_grad_(False)
        block.skip = True

    def remove_one(self, trainer: Any, iteration: int, reason: str) -> None:
        active = [i for i in range(len(self.names)) if i not in {r["index"] for r in self.removed}]
        values = {i: float(self.model.get_submodule(self.names[i]).learnable_shortcut.detach()) for i in active}
        index = max(active, key=lambda i: values[i])
        psnr_before = trainer.history[-1]["psnr"] if trainer.history else None
        self._disable(index)
        record = {"iter": iteration, "index": index, "block": self.names[index], "shortcut": values[index],
                  "psnr_before": psnr_before, "psnr_after": None, "reason": reason}
        self.removed.append(record)
        trainer.emit({"event": "slim", **record,
                      "message": f"iter {iteration}: removed {self.names[index]} (shortcut {values[index]:.4f}, "
                                 f"{reason}; {len(self.names) - len(self.removed)} blocks left)"})

    def before_step(self, trainer: Any, iteration: int) -> None:
        if not self.removed and iteration >= self.first_at:
            self.remove_one(trainer, iteration, "start")
        elif not self.done and iteration == self.total_iters - 1:
            while not self.done:
                self.remove_one(trainer, iteration, "end of training")

    def after_validation(self, trainer: Any, iteration: int, psnr: float) -> None:
        if not self.removed:
            return
        last = self.removed[-1]
        if last["psnr_after"] is None:
            last["psnr_after"] = psnr
            before = "no earlier validation" if last["psnr_before"] is None else f"{last['psnr_before']:.3f} dB"
            trainer.emit({"event": "slim", "message": f"iter {iteration}: PSNR after removing {last['block']}: "
                                                     f"{psnr:.3f} dB (before: {before})"})
        if self.done:
            return
        target_psnr = last["psnr_before"] if last["psnr_before"] is not None else -float("inf")
        if psnr >= target_psnr:
            self.remove_one(trainer, iteration, f"PSNR recovered to {psnr:.3f} dB")
        elif iteration - last["iter"] >= self.max_wait:
            self.remove_one(trainer, iteration, f"waited {self.max_wait} iterations")

    def extra_loss(self, *args: Any) -> None:
        return None


def compact_state_dict(state: dict[str, torch.Tensor], prefix: str, keep: list[int]) -> dict[str, torch.Tensor]:
    """Drop the entries of removed blocks ``<prefix>.<i>.*`` and renumber the kept ones 0..len(keep)-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(keep)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            out[key] = value
            continue
        old = int(match.group(1))
        if old in new_index:
            out[f"{prefix}.{new_index[old]}.{match.group(2)}"] = value
    return out

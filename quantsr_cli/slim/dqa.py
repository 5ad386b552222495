"""QuantSR DQA: one set of weights trained as three depth variants at once.

The released QuantSR code runs versions 0/1/2 (all blocks, about half, about a quarter) on the same batch
and averages their L1 losses (``Q1:sr_model.py:157-192``); a skipped block returns
``x * learnable_shortcut``. Which blocks a shallow variant keeps is hard-coded there from an earlier
training's ranking (32/17/9 blocks). Not having that ranking, quantsr keeps evenly spaced blocks:
``half`` keeps every 2nd block (0, 2, 4, ...) and ``quarter`` every 4th (0, 4, 8, ...), so 16 blocks
give depths 16/8/4. The kept lists travel in the model file's metadata (``extra.dqa``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from quantsr_cli.errors import ConfigError

DQA_DEPTHS = ("full", "half", "quarter")
"""Depth variant names, in training order."""


def dqa_keep_lists(num_blocks: int) -> dict[str, list[int]]:
    """Indices of the blocks each depth variant keeps."""
    return {
        "full": list(range(num_blocks)),
        "half": list(range(0, num_blocks, 2)),
        "quarter": list(range(0, num_blocks, 4)),
    }


def apply_depth(model: nn.Module, keep: list[int]) -> None:
    """Set ``skip`` on every block of ``model`` not in ``keep``."""
    blocks = [model.get_submodule(n) for n in model.block_names()]
    for index, block in enumerate(blocks):
        block.skip = index not in keep


def resolve_depth(model: nn.Module, depth: str, keep_lists: dict[str, list[int]] | None) -> list[int]:
    """Kept block indices for ``depth`` (a variant name) from the file's DQA metadata."""
    if not keep_lists:
        raise ConfigError(f"--depth {depth}: this model was not trained with --dqa")
    if depth not in keep_lists:
        raise ConfigError(f"--depth {depth!r}; choose one of {', '.join(keep_lists)}")
    return list(keep_lists[depth])


def dqa_variants(model: nn.Module) -> list[Callable[[nn.Module], None]]:
    """Callables configuring ``model`` for the full, half and quarter depth (in that order)."""
    keep = dqa_keep_lists(len(model.block_names()))
    return [lambda m, k=keep[name]: apply_depth(m, k) for name in DQA_DEPTHS]

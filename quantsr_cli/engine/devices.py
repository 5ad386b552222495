"""Torch device names given on the command line, checked before any work."""

from __future__ import annotations

import torch

from quantsr_cli.errors import ConfigError


def check_device(name: str) -> str:
    """Return ``name`` when this torch build can use it; ConfigError (one line) otherwise.

    ``cpu``, ``cuda`` and ``cuda:N`` are accepted; CUDA names need a CUDA build of torch and a visible
    GPU (a CPU-only torch would otherwise fail deep inside the first ``.to(device)`` with a traceback).
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible to torch"
            raise ConfigError(f"--device {name}: CUDA is not available ({build}, torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: quantsr runs on cpu or cuda")
    return name

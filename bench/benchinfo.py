"""What every benchmark result records: the code version that measured it and the machine it ran on.

``code_version()`` is ``git describe --always --dirty`` of this checkout plus the package version; cached
rows are reused only when it is the same (a ``-dirty`` tree measures with uncommitted code, so its rows
are its own). Imported by the bench scripts as a sibling module (``python bench/<script>.py`` puts
``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def code_version() -> dict[str, str]:
    """``{"git": <git describe --always --dirty>, "package": <quantsr_cli.__version__>}``."""
    from quantsr_cli import __version__

    try:
        git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        git = "unknown"  # not a git checkout (an installed copy): the package version alone
    return {"git": git, "package": __version__}


def version_text(version: dict[str, str] | None) -> str:
    """``0.1.0+bfd8b74`` (``unknown`` when a record has none)."""
    return f"{version['package']}+{version['git']}" if version else "unknown"


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict[str, Any]:
    """The machine a result was measured on: CPU, cores, torch threads, torch, Python, OS."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform(terse=True)}

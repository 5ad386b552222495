"""What every benchmark result records: the code version that measured it and the machine it ran on.

``code_version()`` is ``git describe --always`` of this checkout plus the package version; uncommitted
changes to the code (``quantsr_cli/``, ``kernels/``, ``presets/``, the bench scripts; not
``bench/results/``, which the scripts write themselves) add ``-dirty-<hash of the changes>``. Cached rows are
reused only when it is the same. Imported by the bench scripts as a sibling module
(``python bench/<script>.py`` puts ``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CODE_PATHS = ("quantsr_cli", "kernels", "presets", "bench", ":(exclude)bench/results")
"""What "the code" is for the version: everything that can change a measurement, not the results."""


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def code_version() -> dict[str, str]:
    """``{"git": <git describe --always --dirty>, "package": <quantsr_cli.__version__>}``."""
    from quantsr_cli import __version__

    try:
        git = _git("describe", "--always").strip() or "unknown"
        changes = hashlib.sha256(_git("diff", "HEAD", "--binary", "--", *CODE_PATHS).encode())
        new_files = _git("ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS).split()
        for name in sorted(new_files):
            changes.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
        if changes.hexdigest() != hashlib.sha256(b"").hexdigest():
            git += "-dirty-" + changes.hexdigest()[:8]
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

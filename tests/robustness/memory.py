"""Peak memory of one real ``python -m quantsr_cli`` run, for the bounded-memory tests.

The CLI runs as the only child of a small wrapper process, which reports the child's peak RSS
(``RUSAGE_CHILDREN``). The child's address space is capped (``RLIMIT_AS``, default 6 GiB) so that a
file that *would* exhaust memory fails with a MemoryError instead of pushing the machine into swap.
(The CUDA builds of torch >= 2.14, which CI installs for torchvision, reserve more than 3 GiB of
address space at import; peak RSS, what the tests bound, is unaffected.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .forkcli import REPO, Result, base_env

_WRAPPER = r"""
import json, resource, subprocess, sys
limit = int(sys.argv[1]) * 2**20
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
r = subprocess.run([sys.executable, "-m", "quantsr_cli", *sys.argv[2:]], capture_output=True, text=True,
                   errors="replace", preexec_fn=cap)
print(json.dumps({"rc": r.returncode, "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:],
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def peak_rss(*args: str, cwd: Path | None = None, address_space_mb: int = 6144,
             env: dict[str, str] | None = None) -> tuple[Result, float]:
    """Run the CLI once; returns its result and its peak RSS in MiB (Linux ``ru_maxrss`` is KiB)."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, str(address_space_mb), *args], cwd=cwd or REPO,
                         env=base_env({"PYTHONPATH": str(REPO), **(env or {})}), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    return Result(data["rc"], data["stdout"], data["stderr"]), float(data["maxrss_mb"])

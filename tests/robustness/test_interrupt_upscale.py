"""``kill -9`` during ``upscale`` of a folder: finished outputs are complete, nothing partial carries an
image name, and ``--skip-existing`` finishes the rest (identical to an uninterrupted run).

Outputs are written to ``.<name>.<pid>.<hex>.tmp`` and renamed, so a kill can only leave such a hidden
``.tmp`` file, never a partial image; the next run into that folder deletes the temp files whose
writer process is gone (a live writer's temp file is kept).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .forkcli import REPO, base_env
from .helpers import fresh_dir, read_any, tree, write_png

N_IMAGES = 14
TEMP = re.compile(r"^\.(.+)\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _inputs(folder: Path) -> list[str]:
    rng = np.random.default_rng(11)
    names = []
    for i in range(N_IMAGES):
        write_png(folder / f"img_{i:02d}.png", (rng.random((96, 80, 3)) * 255).astype(np.uint8))
        names.append(f"img_{i:02d}.png")
    return names


def test_kill9_during_folder_upscale_then_skip_existing(cli, tiny_models, tmp_path: Path) -> None:
    src = fresh_dir(tmp_path / "in")
    names = _inputs(src)
    model = str(tiny_models["packed"])
    opts = ["--model", model, "--tile", "16", "--tile-pad", "8"]  # many tiles: a slow enough run to interrupt
    reference = cli("upscale", str(src), "-o", str(tmp_path / "ref"), *opts)
    assert reference.returncode == 0, reference.stderr[-2000:]
    expected = tree(tmp_path / "ref")
    assert sorted(expected) == names

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "quantsr_cli", "upscale", str(src), "-o", str(out), *opts],
                            cwd=REPO, env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len([n for n in os.listdir(out) if n.endswith(".png")]) >= 3:
                break
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sorted(os.listdir(out))
    finished = [n for n in left if not n.startswith(".")]
    assert 3 <= len(finished) < N_IMAGES, f"kill landed too late to test anything: {left}"
    for name in left:
        if name in finished:  # a complete, valid image identical to the uninterrupted run's
            assert (out / name).read_bytes() == expected[name], name
            assert read_any(out / name).shape == (192, 160, 3)
        else:  # only a hidden temp file of an image that was being written
            m = TEMP.match(name)
            assert m and m.group(1) in names and int(m.group(2)) == proc.pid, left

    # a stale temp file of a long-dead writer and one of a live process (ours): only the first is removed
    stale = out / f".{names[-1]}.4194303.deadbeef.tmp"
    live = out / f".{names[-1]}.{os.getpid()}.0badc0de.tmp"
    stale.write_bytes(expected[names[-1]][:100])
    live.write_bytes(b"in progress")
    again = cli("upscale", str(src), "-o", str(out), *opts, "--skip-existing", "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    report = json.loads(again.stdout)
    assert sorted(Path(p).name for p in report["skipped"]) == finished
    assert sorted(Path(p).name for p in report["written"]) == sorted(set(names) - set(finished))
    assert not stale.exists() and live.exists()
    live.unlink()
    assert tree(out) == expected  # every output present, byte-identical, and no temp file left

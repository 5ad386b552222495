"""``kill -9`` during ``slim`` and ``distill``, then ``--resume``: the final weights are bit-identical to an
uninterrupted run with the same seed (``quantize`` has the same test in tests/test_training.py).

The kill point is random (a checkpoint number drawn per run, and wherever the process is when the
signal lands); ``QUANTSR_TEST_KILL_AT=N`` pins the checkpoint to reproduce a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantsr_cli.packing.io import read_file

from .forkcli import REPO, base_env

ITERS, SAVE_EVERY = 16, 2


def _args(kind: str, models: dict[str, Path], train_dir: Path, run_dir: Path) -> list[str]:
    common = ["--iters", str(ITERS), "--batch-size", "2", "--patch-size", "32", "--save-every", str(SAVE_EVERY),
              "--val-every", "0", "--train-data", str(train_dir), "--run-dir", str(run_dir), "--seed", "5",
              "--threads", "1"]
    if kind == "slim":
        return ["slim", "--model", str(models["student4"]), "--target-blocks", "2", "--start-ratio", "0.25", *common]
    return ["distill", "--model", str(models["student"]), "--teacher", str(models["teacher"]),
            "--feature-weight", "0.01", *common]


def _kill_point() -> int:
    pinned = os.environ.get("QUANTSR_TEST_KILL_AT")
    return int(pinned) if pinned else random.Random().choice(range(SAVE_EVERY, ITERS - SAVE_EVERY + 1, SAVE_EVERY))


def _run_and_kill(args: list[str], run_dir: Path, at: int) -> None:
    """Start a real ``python -m quantsr_cli`` and SIGKILL it once checkpoint ``at`` (or a later one) exists."""
    proc = subprocess.Popen([sys.executable, "-m", "quantsr_cli", *args], cwd=REPO, env=base_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wanted = [f"state_{i:07d}.safetensors" for i in range(at, ITERS + 1, SAVE_EVERY)]
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            folder = run_dir / "checkpoints"
            if folder.is_dir() and any((folder / name).exists() for name in wanted):
                break
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("kind", ["slim", "distill"])
def test_kill9_then_resume_gives_identical_weights(cli, tiny_models, small_train_dir, tmp_path: Path,
                                                   kind: str) -> None:
    full = cli(*_args(kind, tiny_models, small_train_dir, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]
    at = _kill_point()
    run_dir = tmp_path / "killed"
    _run_and_kill(_args(kind, tiny_models, small_train_dir, run_dir), run_dir, at)
    note = f"killed after checkpoint {at} (QUANTSR_TEST_KILL_AT={at} reproduces)"
    assert not (run_dir / "qat_last.safetensors").exists(), f"the run finished before it could be killed; {note}"
    states = sorted((run_dir / "checkpoints").glob("state_*.safetensors"))
    assert states, note
    for state in states:  # every visible checkpoint is complete (atomic writes)
        read_file(state)
    resumed = cli(*_args(kind, tiny_models, small_train_dir, run_dir), "--resume")
    assert resumed.returncode == 0, (note, resumed.stderr[-2000:])
    assert "resumed from" in resumed.stderr, note
    for name in ("qat_last.safetensors", "model.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(run_dir / name)
        assert a.keys() == b.keys(), (name, note)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, note)
    if kind == "slim":
        meta = read_file(run_dir / "model.safetensors")[1]
        assert json.loads(meta["hparams"])["num_block"] == 2  # blocks really removed (4 -> 2)

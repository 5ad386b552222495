"""One run directory, one writer: a second training command on a run folder that a live process is
using is refused at once; a lock left by a process killed with ``kill -9`` is taken over with a
one-line notice; the lock is released when a run ends (normally or with Ctrl-C).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .forkcli import REPO, base_env
from .helpers import error_line

LONG = ("--iters", "1000000", "--val-every", "0", "--patch-size", "16", "--batch-size", "1", "--save-every", "1")
SHORT = ("--iters", "2", "--val-every", "0", "--patch-size", "16", "--batch-size", "1", "--save-every", "1")


def _start(run_dir: Path, model: Path, train: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "quantsr_cli", "quantize", "--model", str(model),
                             "--run-dir", str(run_dir), "--train-data", str(train), *LONG],
                            cwd=REPO, env=base_env({"PYTHONPATH": str(REPO)}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a generous bound for a loaded machine, not a timing assertion
    while not list((run_dir / "checkpoints").glob("state_*.safetensors")):
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first run wrote no checkpoint")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(cli, tiny_models, small_train_dir,
                                                                        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _start(run_dir, tiny_models["qat"], small_train_dir)
    try:
        second = cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--resume",
                     "--train-data", str(small_train_dir), *SHORT)
        error_line(second, str(run_dir), str(first.pid))
        assert second.stdout == ""
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        code, _ = _stop(first)
    assert code == -signal.SIGKILL
    # the killed run's lock is stale: the next run takes it over and says so, in one line
    third = cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--resume",
                "--train-data", str(small_train_dir), *SHORT)
    assert third.returncode == 0, third.stderr[-2000:]
    notices = [ln for ln in third.stderr.splitlines() if "stale" in ln]
    assert len(notices) == 1 and str(first.pid) in notices[0], third.stderr[-2000:]
    # a finished run released its lock: no notice the next time
    fourth = cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--resume",
                 "--train-data", str(small_train_dir), *SHORT)
    assert fourth.returncode == 0, fourth.stderr[-2000:]
    assert "stale" not in fourth.stderr and "in use" not in fourth.stderr


def test_ctrl_c_prints_one_line_and_releases_the_run(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _start(run_dir, tiny_models["qat"], small_train_dir)
    code, err = _stop(first, signal.SIGINT)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert [ln for ln in lines if "interrupt" in ln.lower()] == ["interrupted"] and lines[-1] == "interrupted", err
    again = cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--resume",
                "--train-data", str(small_train_dir), *SHORT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stale" not in again.stderr

"""Interrupted work leaves nothing half-written: a process killed while saving leaves the previous file
intact (``summary.json`` included), and its temporary file is removed by the next run in that folder.

The kill is made deterministic by a wrapper that runs the real CLI with ``os.replace`` (the atomic
rename) and direct writes to one file name patched to ``SIGKILL`` the process at that moment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from .forkcli import REPO, base_env
from .helpers import QUICK_TRAIN, fresh_dir, hidden_leftovers, strict_json, write_png

_KILLER = r"""
import builtins, io, os, signal, sys
target = sys.argv[1]

def _hit(path):
    return target == "*" or os.path.basename(os.fsdecode(os.fspath(path))) == target

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

_replace, _rename = os.replace, os.rename
def replace(src, dst, *a, **k):
    if _hit(dst):
        _die()
    return _replace(src, dst, *a, **k)
def rename(src, dst, *a, **k):
    if _hit(dst):
        _die()
    return _rename(src, dst, *a, **k)
os.replace, os.rename = replace, rename

class _HalfWriter:
    def __init__(self, fh):
        self.fh = fh
    def write(self, data):
        self.fh.write(data[: max(1, len(data) // 2)])
        self.fh.flush()
        _die()
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()
    def __getattr__(self, name):
        return getattr(self.fh, name)

_open = io.open
def opener(file, mode="r", *a, **k):
    fh = _open(file, mode, *a, **k)
    if target != "*" and isinstance(file, (str, bytes, os.PathLike)) and ("w" in mode or "a" in mode) and _hit(file):
        return _HalfWriter(fh)
    return fh
io.open = builtins.open = opener

sys.argv = ["quantsr", *sys.argv[2:]]
from quantsr_cli.cli.app import main
main()
"""


def killed_run(target: str, *args: str, env: dict[str, str] | None = None) -> int:
    """Run the CLI, SIGKILLed when it renames onto (or writes directly into) a file named ``target``."""
    r = subprocess.run([sys.executable, "-c", _KILLER, target, *args], cwd=REPO,
                       env=base_env({"PYTHONPATH": str(REPO), **(env or {})}), capture_output=True, text=True,
                       timeout=600)
    return r.returncode


def test_pack_killed_while_saving_leaves_nothing_after_the_next_run(cli, tiny_models, tmp_path: Path) -> None:
    out = fresh_dir(tmp_path / "out")
    dst = out / "p.safetensors"
    assert killed_run("*", "pack", str(tiny_models["qat"]), "-o", str(dst)) == -signal.SIGKILL
    assert not dst.exists()  # never a half-written file under the final name
    result = cli("pack", str(tiny_models["qat"]), "-o", str(dst))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["p.safetensors"]


def test_training_killed_while_saving_a_checkpoint(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir),
            "--train-data", str(small_train_dir), *QUICK_TRAIN)
    assert killed_run("*", *args) == -signal.SIGKILL
    result = cli(*args, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    assert hidden_leftovers(run_dir) == []


def test_eval_killed_while_saving_an_image(cli, tiny_models, tmp_path: Path) -> None:
    ds = fresh_dir(tmp_path / "ds")
    write_png(ds / "a.png", (np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8))
    save = tmp_path / "sr"
    args = ("eval", "--model", str(tiny_models["packed"]), "--dataset", str(ds), "--save-dir", str(save))
    env = {"QUANTSR_CACHE": str(tmp_path / "cache")}
    assert killed_run("a.png", *args, env=env) == -signal.SIGKILL
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert hidden_leftovers(save) == []
    assert sorted(p.name for p in (save / "ds").iterdir()) == ["a.png"]


def test_summary_json_is_never_half_written(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir),
            "--train-data", str(small_train_dir), *QUICK_TRAIN]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run_dir / "summary.json").read_text()
    more = [*args[:-len(QUICK_TRAIN)], *QUICK_TRAIN[2:], "--iters", "2", "--resume"]
    assert killed_run("summary.json", *more) == -signal.SIGKILL
    assert (run_dir / "summary.json").read_text() == before  # the previous summary, whole
    result = cli(*more)
    assert result.returncode == 0, result.stderr[-2000:]
    assert strict_json((run_dir / "summary.json").read_text())["iters"] == 2
    assert hidden_leftovers(run_dir) == []

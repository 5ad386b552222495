"""A full disk or a permission error while saving never costs the previous checkpoint.

Function-level: the one writer (:func:`quantsr_cli.fileio.atomic_write`) is made to fail at each step
(create the temp file, write half of it, fsync, rename) by monkeypatching, since tests often run as root where ``chmod`` blocks nothing. After
each failure: our error type naming the file, the previous state still loads and restores exactly,
and no temp file is left behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from quantsr_cli import fileio
from quantsr_cli.data import io as image_io
from quantsr_cli.engine import checkpoint as ckpt
from quantsr_cli.errors import CheckpointError, ImageError
from quantsr_cli.models import build_model
from quantsr_cli.packing import io as packing_io


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model("quantsr-c", upscale=2, num_block=1, num_feat=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    optimizer.step()
    return model, optimizer


def _save(run_dir: Path, iteration: int, seed: int) -> Path:
    model, optimizer = _model_and_optimizer(seed)
    return ckpt.save_state(run_dir, iteration, model, optimizer, {"best_psnr": None, "hooks": []},
                           {"arch": "quantsr-c"})


def _fail_on_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The data file accepts half of the bytes, then the disk is full."""
    real_fdopen = os.fdopen

    class HalfFull:
        def __init__(self, fh) -> None:
            self.fh = fh

        def write(self, data: bytes) -> int:
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.fh.close()

    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, *a, **k: HalfFull(real_fdopen(fd, *a, **k)))


def _raise(err: int, text: str):
    def fail(*_: object, **__: object) -> None:
        raise OSError(err, text)

    return fail


FAILURES = {
    "disk_full_mid_write": (_fail_on_write, "No space left"),
    "fsync_io_error": (lambda mp: mp.setattr(fileio.os, "fsync", _raise(errno.EIO, "Input/output error")),
                       "Input/output error"),
    "rename_disk_full": (lambda mp: mp.setattr(fileio.os, "replace", _raise(errno.ENOSPC, "No space left on device")),
                         "No space left"),
    "permission_denied": (lambda mp: mp.setattr(fileio.os, "open", _raise(errno.EACCES, "Permission denied")),
                          "Permission denied"),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_checkpoint_save_keeps_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     failure: str) -> None:
    first = _save(tmp_path, 2, seed=0)
    before = first.read_bytes()
    install, words = FAILURES[failure]
    with monkeypatch.context() as mp:
        install(mp)
        with pytest.raises(CheckpointError, match=words) as err:
            _save(tmp_path, 4, seed=1)
    assert "state_0000004" in str(err.value) and "\n" not in str(err.value)
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == [first.name], files  # no new state, no temp file, the old one not pruned
    assert first.read_bytes() == before
    path, tensors, meta = ckpt.load_latest_state(tmp_path)
    assert path == first
    model, optimizer = _model_and_optimizer(seed=5)
    iteration, _ = ckpt.restore_state(tensors, meta, model, optimizer, path)
    reference, _ = _model_and_optimizer(seed=0)
    assert iteration == 2
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_truncated_newest_state_is_skipped_on_resume(tmp_path: Path) -> None:
    """A newest state cut short (e.g. a file system without atomic rename): resume takes the previous one."""
    first = _save(tmp_path, 2, seed=0)
    newest = _save(tmp_path, 4, seed=1)
    newest.write_bytes(newest.read_bytes()[:-100])
    skipped: list[str] = []
    path, _, meta = ckpt.load_latest_state(tmp_path, on_skip=skipped.append)
    assert path == first and meta["iteration"] == "2"
    assert len(skipped) == 1 and newest.name in skipped[0]


def test_failed_model_file_overwrite_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    path = tmp_path / "qat_last.safetensors"
    packing_io.save_model(build_model("quantsr-c", upscale=2, num_block=1, num_feat=8), path)
    before = path.read_bytes()
    _fail_on_write(monkeypatch)
    with pytest.raises(CheckpointError, match="qat_last.safetensors"):
        packing_io.save_model(build_model("quantsr-c", upscale=2, num_block=1, num_feat=8), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    packing_io.load_model_file(path)


def test_failed_image_write_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.png"
    image_io.write_image(path, torch.zeros(1, 3, 8, 8))
    before = path.read_bytes()
    monkeypatch.setattr(image_io.os, "replace", _raise(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ImageError, match="No space left") as err:
        image_io.write_image(path, torch.ones(1, 3, 8, 8))
    assert str(path) in str(err.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.png"]

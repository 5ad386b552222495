"""Long work made visible: the phase lines and the one progress bar of ``quantize``, it/s and ETA (also after
``--resume``), a never-stale val column, ``train_log.jsonl`` records of loss/lr/it/s, TensorBoard and
validation images; and no progress bar before a usage or data error (quantize, eval, upscale)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from quantsr_cli.cli.common import TrainRenderer
from quantsr_cli.config import QuantConfig, TrainConfig
from quantsr_cli.engine import tblog
from quantsr_cli.engine.quantize import QuantizeJob, run_quantize
from quantsr_cli.engine.trainer import Trainer
from tests.conftest import run_cli

BAR = "━"


def strict(line: str) -> dict:
    """``json.loads`` that refuses NaN/Infinity (not JSON)."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")
    return json.loads(line, parse_constant=refuse)


class FakeClock:
    """Seconds that advance by ``step`` per call."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _trainer(run_dir: Path, iters: int, clock: FakeClock, events: list) -> Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))
    g = torch.Generator().manual_seed(1)

    def batch(iteration: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(n, 3, 8, 8, generator=g), torch.rand(n, 3, 16, 16, generator=g)

    cfg = TrainConfig(iters=iters, batch_size=2, val_every=0, save_every=3, log_every=2)
    return Trainer(model=model, cfg=cfg, run_dir=run_dir, sample_batch=batch, on_event=events.append, clock=clock)


def test_rate_and_eta_every_iteration_and_after_resume(tmp_path: Path) -> None:
    events: list = []
    _trainer(tmp_path, 6, FakeClock(1.0), events).train()
    steps = [e for e in events if e["event"] == "step"]
    assert [e["iter"] for e in steps] == [1, 2, 3, 4, 5, 6]  # the bar moves every iteration
    assert all(e["it_s"] == pytest.approx(1.0) for e in steps)
    assert [e["eta_s"] for e in steps] == pytest.approx([5, 4, 3, 2, 1, 0])

    events.clear()
    resumed = _trainer(tmp_path, 10, FakeClock(0.5), events)
    assert resumed.resume() and resumed.iteration == 6
    resumed.train()
    steps = [e for e in events if e["event"] == "step"]
    assert [e["iter"] for e in steps] == [7, 8, 9, 10]
    assert all(e["it_s"] == pytest.approx(2.0) for e in steps)  # this process's rate, not 7 iterations / 0.5 s
    assert steps[1]["eta_s"] == pytest.approx(1.0)


def test_train_log_has_loss_lr_and_rate_every_log_every_as_strict_json(tmp_path: Path) -> None:
    _trainer(tmp_path, 5, FakeClock(1.0), []).train()
    records = [strict(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["iter"] for r in train] == [2, 4, 5]  # every log_every, and the last iteration
    for r in train:
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] > 0
        assert isinstance(r["lr"], float) and 0 < r["lr"] <= 2e-4
        assert r["it_s"] == pytest.approx(1.0)
    done = records[-1]
    assert done["event"] == "done" and done["best_psnr"] is None  # no validation: null, not -Infinity
    assert not any(r["event"] in ("step", "phase") for r in records)


def _renderer() -> tuple[TrainRenderer, io.StringIO]:
    out = io.StringIO()
    return TrainRenderer("net W2A2", console=Console(file=out, width=200, force_terminal=False)), out


def test_renderer_prints_phases_without_a_bar_until_training() -> None:
    renderer, out = _renderer()
    renderer({"event": "phase", "phase": "loading data", "message": "T91, BSD200"})
    renderer({"event": "phase", "phase": "calibrating", "message": "16 patches"})
    assert not renderer.progress.started and renderer.task is None
    assert out.getvalue().splitlines() == ["loading data: T91, BSD200", "calibrating: 16 patches"]
    renderer({"event": "phase", "phase": "training", "iter": 0, "iters": 10})
    assert renderer.progress.started
    renderer.close()


def test_renderer_val_column_is_never_stale_and_eta_is_shown() -> None:
    renderer, _ = _renderer()
    renderer({"event": "phase", "phase": "training", "iter": 4, "iters": 10})
    task = renderer.progress.progress.tasks[0]
    assert task.completed == 4  # a resumed run starts where it resumed
    renderer({"event": "step", "iter": 5, "iters": 10, "loss": 0.25, "it_s": 2.0, "eta_s": 2.5})
    assert task.completed == 5 and "loss 0.2500" in task.fields["info"] and "2.00 it/s" in task.fields["info"]
    assert task.fields["eta"] == "0:00:02"
    renderer({"event": "phase", "phase": "validating", "iter": 5})
    assert "validating" in task.fields["info"]
    renderer({"event": "val", "iter": 5, "psnr": 21.8, "best": 21.8, "improved": True})
    assert "val 21.80 dB" in task.fields["info"]  # at once, not at the next step
    renderer({"event": "val", "iter": 10, "psnr": 22.5, "best": 22.5, "improved": True})
    assert "val 22.50 dB" in task.fields["info"]
    renderer.close()


def test_tensorboard_and_validation_images(tmp_path: Path, tiny_train_dir: Path, shared_data: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    scalars: list[tuple[str, float, int]] = []

    class FakeWriter:
        closed = False

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            FakeWriter.closed = True

    monkeypatch.setattr(tblog, "require_tensorboard", lambda: None)
    monkeypatch.setattr(tblog, "summary_writer", lambda log_dir: FakeWriter())
    train = TrainConfig(iters=4, batch_size=2, patch_size=32, val_every=2, save_every=4, log_every=2,
                        train_data=(str(tiny_train_dir),), val_dataset="Set5", val_max_images=3,
                        tensorboard=True, save_val_images=2)
    job = QuantizeJob(arch="quantsr-c", scale=4, quant=QuantConfig("rbd", 4, 4), blocks=2, run_dir=tmp_path / "r",
                      train=train)
    events: list = []
    run_quantize(job, on_event=events.append)
    tags = {(tag, step) for tag, _, step in scalars}
    assert {("train/loss", 2), ("train/lr", 4), ("train/it_s", 4), ("val/psnr", 2), ("val/psnr", 4)} <= tags
    assert FakeWriter.closed
    shots = sorted(p.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r" / "visualization").rglob("*"))
    assert shots == ["visualization/Set5", "visualization/Set5/baby_2.png", "visualization/Set5/baby_4.png",
                     "visualization/Set5/bird_2.png", "visualization/Set5/bird_4.png"]
    phases = [e["phase"] for e in events if e["event"] == "phase"]
    assert phases == ["loading data", "calibrating", "training", "validating", "validating", "packing"]


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path: Path, tiny_train_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    job = QuantizeJob(arch="quantsr-c", scale=4, quant=QuantConfig("rbd", 4, 4), blocks=2, run_dir=tmp_path / "r",
                      train=TrainConfig(iters=2, batch_size=2, patch_size=32, val_every=0, tensorboard=True,
                                        train_data=(str(tiny_train_dir),)))
    events: list = []
    with pytest.raises(Exception, match="pip install tensorboard"):
        run_quantize(job, on_event=events.append)
    assert not any(e.get("phase") == "loading data" for e in events)


@pytest.mark.parametrize("case", ["usage", "no data", "bad val set", "eval dataset", "upscale input", "cuda"])
def test_no_progress_bar_before_a_usage_or_data_error(case: str, tmp_path: Path) -> None:
    run = ["--run-dir", str(tmp_path / "run"), "--arch", "quantsr-c", "--blocks", "2", "--iters", "2"]
    args = {
        "usage": ["quantize", *run, "--iters", "zero"],
        "no data": ["quantize", *run, "--train-data", str(tmp_path / "missing"), "--val-every", "0"],
        "bad val set": ["quantize", *run, "--train-data", str(tmp_path), "--val-dataset", "NoSuchSet"],
        "eval dataset": ["eval", "--dataset", "NoSuchSet"],
        "upscale input": ["upscale", str(tmp_path / "nothere.png"), "-o", str(tmp_path / "x.png")],
        "cuda": ["quantize", *run, "--device", "cuda"],
    }[case]
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_cli(*args)
    assert result.returncode == (2 if case == "usage" else 1), result.stderr
    # no bar and no "0/2"-style counter (a temp path such as ".../pytest-200/..." is not one)
    assert BAR not in result.stderr and not re.search(r"(?<![\w.-])\d+/\d", result.stderr), result.stderr
    if case == "cuda":  # one line, like upscale and eval (tests/test_upscale_options.py)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert "--device cuda: CUDA is not available" in result.stderr
    if case != "usage":
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_quantize_cli_phases_bar_and_strict_log(tmp_path: Path, tiny_train_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("quantize", "--arch", "quantsr-c", "--blocks", "2", "--bits", "4", "--iters", "3",
                     "--batch-size", "2", "--patch-size", "32", "--val-every", "0", "--log-every", "1",
                     "--train-data", str(tiny_train_dir), "--run-dir", str(run_dir), "--threads", "1")
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "model: quantsr-c x4, starting from fresh random weights (no --init)" in err
    assert err.index("loading data: ") < err.index("calibrating: ") < err.index(BAR) < err.index("packing: ")
    assert "3/3" in err
    train = [strict(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in train if r["event"] == "train"] == [1, 2, 3]
    assert all({"loss", "lr", "it_s"} <= set(r) for r in train if r["event"] == "train")

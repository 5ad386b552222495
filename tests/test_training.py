"""The training loop: every method runs, resume after kill -9 is exact, DQA, slim (QSA), distill (SFD), DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantsr_cli.config import QuantConfig, TrainConfig
from quantsr_cli.engine.quantize import QuantizeJob, run_quantize
from quantsr_cli.engine.trainer import lr_at
from quantsr_cli.models import build_model
from quantsr_cli.packing.io import load_model_file, read_metadata
from quantsr_cli.quant import METHODS
from tests.conftest import REPO, data_dir, run_cli


def tiny_train(tmp: Path, train_dir: Path, **kw: object) -> TrainConfig:
    base = dict(iters=5, batch_size=2, patch_size=32, val_every=0, save_every=5, log_every=1,
                train_data=(str(train_dir),), val_dataset="")
    base.update(kw)
    return TrainConfig(**base)


def test_cosine_and_multistep_schedules() -> None:
    cfg = TrainConfig(iters=100, lr=1e-3, eta_min=0.0)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 50) == pytest.approx(5e-4)
    step = TrainConfig(iters=100, lr=1e-3, scheduler="multistep", milestones=(10, 20), gamma=0.5)
    assert [lr_at(step, i) for i in (9, 10, 20)] == pytest.approx([1e-3, 5e-4, 2.5e-4])


@pytest.mark.parametrize("arch", ["quantsr-c", "swinir-s"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_five_iterations(tmp_path: Path, tiny_train_dir: Path, arch: str, bits: int,
                                             method: str) -> None:
    job = QuantizeJob(arch=arch, scale=4, quant=QuantConfig(method=method, w_bits=bits, a_bits=bits),
                      train=tiny_train(tmp_path, tiny_train_dir), blocks=1, run_dir=tmp_path / "run")
    summary = run_quantize(job)
    assert summary["iters"] == 5
    model = load_model_file(Path(summary["out"]))
    out = model(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    meta = read_metadata(Path(summary["out"]))
    assert meta["kind"] == "packed" and meta["method"] == method and meta["w_bits"] == str(bits)


def _quantize_args(run_dir: Path, train_dir: Path, iters: int) -> list[str]:
    return ["quantize", "--arch", "quantsr-c", "--blocks", "2", "--bits", "2", "--iters", str(iters),
            "--batch-size", "2", "--patch-size", "32", "--save-every", "2", "--val-every", "0",
            "--train-data", str(train_dir), "--run-dir", str(run_dir), "--seed", "3", "--threads", "1"]


def test_kill9_then_resume_gives_identical_weights(tmp_path: Path, tiny_train_dir: Path) -> None:
    iters = 12
    full = run_cli(*_quantize_args(tmp_path / "full", tiny_train_dir, iters))
    assert full.returncode == 0, full.stderr
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": str(data_dir())}
    proc = subprocess.Popen([sys.executable, "-m", "quantsr_cli", *_quantize_args(run_dir, tiny_train_dir, iters)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("state_000000[4-9].safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "qat_last.safetensors").exists(), "the run finished before it could be killed"
    resumed = run_cli(*_quantize_args(run_dir, tiny_train_dir, iters), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    a = load_file(tmp_path / "full" / "qat_last.safetensors")
    b = load_file(run_dir / "qat_last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_existing_run_dir_needs_resume(tmp_path: Path, tiny_train_dir: Path) -> None:
    first = run_cli(*_quantize_args(tmp_path / "r", tiny_train_dir, 2))
    assert first.returncode == 0, first.stderr
    again = run_cli(*_quantize_args(tmp_path / "r", tiny_train_dir, 2))
    assert again.returncode == 1 and "--resume" in again.stderr


def test_dqa_model_evaluates_at_three_depths(tmp_path: Path, tiny_train_dir: Path, shared_data: Path) -> None:
    job = QuantizeJob(arch="quantsr-c", scale=4, quant=QuantConfig("rbd", 4, 4), blocks=4, run_dir=tmp_path / "r",
                      train=tiny_train(tmp_path, tiny_train_dir, dqa=True, iters=3))
    summary = run_quantize(job)
    extra = json.loads(read_metadata(Path(summary["out"]))["extra"])
    assert extra["dqa"] == {"full": [0, 1, 2, 3], "half": [0, 2], "quarter": [0]}
    psnrs = {}
    for depth in ("full", "half", "quarter"):
        result = run_cli("eval", "--model", summary["out"], "--dataset", "Set5", "--depth", depth, "--json")
        assert result.returncode == 0, result.stderr
        psnrs[depth] = json.loads(result.stdout)["datasets"]["Set5"]["psnr"]
    assert len(set(psnrs.values())) == 3  # three different networks


def test_slim_4_to_2_blocks_writes_2_blocks(tmp_path: Path, tiny_train_dir: Path, shared_data: Path) -> None:
    job = QuantizeJob(arch="quantsr-c", scale=4, quant=QuantConfig("rbd", 2, 2), blocks=4, run_dir=tmp_path / "r",
                      train=tiny_train(tmp_path, tiny_train_dir, iters=10, slim_to=2, val_every=2,
                                       val_dataset="Set5", val_max_images=1))
    summary = run_quantize(job)
    meta = read_metadata(Path(summary["out"]))
    assert json.loads(meta["hparams"])["num_block"] == 2
    extra = json.loads(meta["extra"])
    assert extra["slim"]["to_blocks"] == 2 and len(extra["slim"]["removed"]) == 2
    model = load_model_file(Path(summary["out"]))
    assert len(model.block_names()) == 2
    assert model(torch.rand(1, 3, 12, 12)).shape == (1, 3, 48, 48)
    log = (tmp_path / "r" / "train_log.jsonl").read_text()
    assert log.count('"event": "slim"') >= 2


def test_slim_swinir_built_with_fixed_shortcuts(tmp_path: Path, tiny_train_dir: Path, shared_data: Path) -> None:
    """The QuantSR+-T recipe: SwinIR is built with official keys (fixed shortcuts); slimming makes them trainable."""
    job = QuantizeJob(arch="swinir-s", scale=4, quant=QuantConfig("rbd", 2, 2), blocks=4, run_dir=tmp_path / "r",
                      train=tiny_train(tmp_path, tiny_train_dir, iters=4, slim_to=2, batch_size=1))
    summary = run_quantize(job)
    meta = read_metadata(Path(summary["out"]))
    hparams = json.loads(meta["hparams"])
    assert len(hparams["depths"]) == 2 and hparams["learnable_shortcut"] is True
    assert json.loads(meta["extra"])["slim"]["to_blocks"] == 2
    model = load_model_file(Path(summary["out"]))
    assert len(model.block_names()) == 2
    assert all(isinstance(b.learnable_shortcut, torch.nn.Parameter) for b in model.blocks())
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 64, 64)


def test_slim_removes_largest_shortcut_first() -> None:
    from quantsr_cli.slim import SlimHook

    class FakeTrainer:
        history: list = []

        def emit(self, event: dict) -> None:
            pass

    model = build_model("quantsr-c", upscale=2, num_block=4)
    with torch.no_grad():
        for value, block in zip((0.9, 1.3, 1.1, 0.7), model.blocks()):
            block.learnable_shortcut.fill_(value)
    hook = SlimHook(model, target=2, total_iters=100)
    hook.before_step(FakeTrainer(), 20)
    hook.after_validation(FakeTrainer(), 40, 0.0)  # PSNR "recovered" (no reference) -> next removal
    assert [r["index"] for r in hook.removed] == [1, 2]
    assert model.blocks()[1].skip and not model.blocks()[1].learnable_shortcut.requires_grad
    assert float(model.blocks()[1].learnable_shortcut) == 1.0


def test_sfd_loss_zero_for_identical_teacher_and_grad_reaches_student_only() -> None:
    from quantsr_cli.distill import FeatureDistillHook

    torch.manual_seed(0)
    student = build_model("quantsr-c", upscale=2, num_block=2)
    teacher = build_model("quantsr-c", upscale=2, num_block=2)
    teacher.load_state_dict(student.state_dict())
    hook = FeatureDistillHook(student, teacher, weight=1.0)
    x = torch.rand(1, 3, 8, 8)
    sr = student(x)
    assert float(hook.extra_loss(None, x, None, sr)) == 0.0
    with torch.no_grad():
        teacher.body[0].conv1.weight.add_(0.1)
    sr = student(x)
    loss = hook.extra_loss(None, x, None, sr)
    assert float(loss) > 0
    loss.backward()
    assert student.body[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_torchrun_two_cpu_processes(tmp_path: Path, tiny_train_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": str(data_dir())}
    args = _quantize_args(tmp_path / "ddp", tiny_train_dir, 4)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29533", "-m", "quantsr_cli", *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "ddp" / "qat_last.safetensors").is_file()


@pytest.mark.slow
def test_user_example_swinir_w2_twenty_iterations(tmp_path: Path, shared_data: Path) -> None:
    """Issue acceptance: `quantsr quantize --bits 2 --arch swinir-s --iters 20 --out s.safetensors`, then eval."""
    out = tmp_path / "s.safetensors"
    result = run_cli("quantize", "--bits", "2", "--arch", "swinir-s", "--iters", "20", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "swinir-s_x4_w2a2" / "qat_last.safetensors").is_file()
    evaluated = run_cli("eval", "--model", str(out), "--dataset", "Set5", "--scale", "4", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["datasets"]["Set5"]["psnr"] > 10


def test_act_sign_and_bias_correction_flags_reach_the_run(tmp_path: Path, tiny_train_dir: Path) -> None:
    """``--act-sign mse --no-bias-correction`` through the real CLI: recorded in the run's metadata,
    and the FP biases untouched by calibration (the default run's corrected biases differ)."""
    runs = {}
    for name, extra in (("plain", ["--act-sign", "mse", "--no-bias-correction"]), ("default", [])):
        args = _quantize_args(tmp_path / name, tiny_train_dir, 1)
        proc = run_cli(*args, "--lr", "1e-12", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[name] = tmp_path / name / "qat_last.safetensors"
    meta = json.loads(read_metadata(runs["plain"])["extra"])
    assert meta["act_sign"] == "mse" and meta["bias_correction"] is False
    assert json.loads(read_metadata(runs["default"])["extra"])["act_sign"] == "min"
    plain, default = load_file(str(runs["plain"])), load_file(str(runs["default"]))
    assert not torch.allclose(plain["body.0.conv1.bias"], default["body.0.conv1.bias"])


def test_every_bundled_preset_builds_a_valid_job() -> None:
    from quantsr_cli.cli.quantize import build_job, resolve_options
    from quantsr_cli.presets import list_presets

    names = list_presets()
    assert {"imdn_x4_w4a4", "imdn_x4_w2a2", "swinir-s_x4_w2a2"} <= set(names)
    for name in names:
        opts, used = resolve_options({}, None, name)
        job = build_job(opts, run_dir=None, out=None, resume=False, device="cpu")
        assert used == name and job.train.iters >= 1
    w2 = build_job(resolve_options({}, None, "imdn_x4_w2a2")[0], run_dir=None, out=None, resume=False, device="cpu")
    assert w2.quant.act_sign == "mse" and w2.quant.method == "rbd" and w2.train.bias_correction
    flag = resolve_options({"act_sign": "min"}, None, "imdn_x4_w2a2")[0]  # a flag beats the preset
    assert build_job(flag, run_dir=None, out=None, resume=False, device="cpu").quant.act_sign == "min"


def test_ema_follows_the_update_rule_and_resumes_exactly(tmp_path: Path, tiny_train_dir: Path) -> None:
    from quantsr_cli.engine.quantize import build_initial_model, prepare_training

    decay = 0.75

    def job(run_dir: Path, iters: int, resume: bool = False) -> QuantizeJob:
        return QuantizeJob(arch="quantsr-c", scale=4, quant=QuantConfig("rbd", 2, 2), blocks=1, run_dir=run_dir,
                           resume=resume, train=tiny_train(tmp_path, tiny_train_dir, iters=iters, save_every=2,
                                                           ema_decay=decay))

    # one step by hand: θ_ema = d·θ_0 + (1 − d)·θ_1 for every parameter, buffers copied
    torch.manual_seed(0)
    j = job(tmp_path / "one", 1)
    trainer = prepare_training(j, build_initial_model(j), None)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    ema = dict(trainer.ema.named_parameters())
    moved = 0
    for name, p0 in before.items():
        expected = decay * p0 + (1 - decay) * after[name].detach()
        assert torch.allclose(ema[name], expected, atol=1e-7), name
        moved += int(not torch.equal(p0, after[name]))
    assert moved > 0 and not ema["conv_first.weight"].requires_grad
    for (name, b_ema), (_, b) in zip(trainer.ema.named_buffers(), trainer.model.named_buffers()):
        assert torch.equal(b_ema, b), name

    # the written models are the EMA ones, and a run resumed from iteration 2 ends with the same EMA weights
    torch.manual_seed(0)
    full = run_quantize(job(tmp_path / "full", 4))
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "state_0000002.safetensors", tmp_path / "part" / "checkpoints")
    torch.manual_seed(1)
    part = run_quantize(job(tmp_path / "part", 4, resume=True))
    a, b = load_file(full["qat_last"]), load_file(part["qat_last"])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = load_file(sorted((tmp_path / "full" / "checkpoints").glob("state_*.safetensors"))[-1])
    assert torch.equal(state["ema.conv_first.weight"], a["conv_first.weight"])
    assert not torch.equal(state["model.conv_first.weight"], a["conv_first.weight"])


def test_ema_decay_validation() -> None:
    from quantsr_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="slim_to"):
        TrainConfig(ema_decay=0.999, slim_to=2)


def test_ema_decay_flag_validates_both_models(tmp_path: Path, tiny_train_dir: Path, shared_data: Path) -> None:
    run_dir = tmp_path / "run"
    args = _quantize_args(run_dir, tiny_train_dir, 2)
    args[args.index("--val-every") + 1] = "2"
    result = run_cli(*args, "--ema-decay", "0.9")
    assert result.returncode == 0, result.stderr
    vals = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()
            if '"val"' in line]
    assert len(vals) == 1 and vals[0]["psnr"] != vals[0]["psnr_raw"] and vals[0]["psnr"] > 0
    meta = read_metadata(Path(result.stdout.strip()))
    assert json.loads(meta["extra"])["ema_decay"] == 0.9

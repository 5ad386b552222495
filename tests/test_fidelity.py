"""Issue #25, fidelity to the released QuantSR code: SwinIR attention's v quantizer (shared with q on
request) and stochastic depth for the swinir-s training presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from quantsr_cli.cli.quantize import build_job, resolve_options
from quantsr_cli.config import QuantConfig, TrainConfig
from quantsr_cli.engine.quantize import QuantizeJob, build_initial_model, run_quantize
from quantsr_cli.engine.report import model_info
from quantsr_cli.errors import ConfigError
from quantsr_cli.metrics.complexity import count_macs
from quantsr_cli.models import build_model
from quantsr_cli.models.common import DropPath
from quantsr_cli.packing import io
from quantsr_cli.packing.modules import PackedActQuant
from quantsr_cli.presets import list_presets, load_preset
from quantsr_cli.quant import ActQuant, calibrate_, quantize_, quantizer_parameters
from tests.conftest import run_cli

TINY = {"upscale": 2, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4}
W2A2 = QuantConfig("rbd", 2, 2)


def _qat(share: bool, seed: int = 0) -> torch.nn.Module:
    """A tiny SwinIR-S quantized at RBD W2A2 and calibrated on one random batch (eval mode)."""
    torch.manual_seed(seed)
    model = quantize_(build_model("swinir-s", share_qv_quantizer=share, **TINY), W2A2)
    calibrate_(model, torch.rand(2, 3, 16, 16))
    return model.eval()


def _attn(model: torch.nn.Module, block: int = 1) -> torch.nn.Module:
    return model.layers[0].residual_group.blocks[block].attn


# ------------------------------------------------------------------------------- v quantizer
def test_shared_option_quantizes_q_and_v_with_one_quantizer_initialised_on_q() -> None:
    torch.manual_seed(0)
    model = quantize_(build_model("swinir-s", share_qv_quantizer=True, **TINY), W2A2)
    assert model.hparams["share_qv_quantizer"] is True
    attn = _attn(model)
    assert isinstance(attn.q_act, ActQuant) and not hasattr(attn, "v_act")
    assert not any(n.endswith("v_act") for n, _ in model.named_modules())
    calls: list[torch.Tensor] = []
    attn.q_act.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    calibrate_(model, torch.rand(2, 3, 16, 16))
    q_in, v_in = calls  # one module, called on q then on v
    qz = attn.q_act.act_q
    qmax = qz.qrange[1]
    assert bool(qz.signed)
    # one init, on q alone (the release: step and signedness set on the first call)
    torch.testing.assert_close(qz.step.detach(), (2 * q_in.abs().mean() / math.sqrt(qmax)).reshape(1))
    assert not torch.allclose(qz.step.detach(), (2 * v_in.abs().mean() / math.sqrt(qmax)).reshape(1))
    # one step: three activation points (q/v, k, softmax) per attention instead of four
    assert sum(isinstance(m, ActQuant) for m in attn.modules()) == 3
    steps = {id(p) for m in attn.modules() if isinstance(m, ActQuant) for p in quantizer_parameters(m)}
    assert len(steps) == 3


def test_default_keeps_separate_q_and_v_quantizers() -> None:
    model = _qat(share=False)
    attn = _attn(model)
    assert model.hparams["share_qv_quantizer"] is False
    assert isinstance(attn.v_act, ActQuant) and attn.v_act is not attn.q_act
    assert sum(isinstance(m, ActQuant) for m in attn.modules()) == 4
    assert not torch.equal(attn.v_act.act_q.step, attn.q_act.act_q.step)


def test_shared_model_equals_default_model_whose_v_quantizer_is_a_copy_of_q() -> None:
    """Sharing means exactly: v quantized with q's step and grid (what ``v = self.q_actq(v)`` does)."""
    shared = _qat(share=True)
    separate = quantize_(build_model("swinir-s", **TINY), W2A2)
    state = shared.state_dict()
    for i in range(2):
        prefix = f"layers.0.residual_group.blocks.{i}.attn."
        for key in ("step", "signed", "initialized"):
            state[f"{prefix}v_act.act_q.{key}"] = state[f"{prefix}q_act.act_q.{key}"]
    separate.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        assert torch.equal(shared(x), separate.eval()(x))
        separate.layers[0].residual_group.blocks[1].attn.v_act.act_q.step.mul_(1.5)
        assert not torch.equal(shared(x), separate(x))


def test_packed_file_made_with_the_option_reloads_with_it(tmp_path: Path) -> None:
    model = _qat(share=True)
    path = tmp_path / "shared.safetensors"
    io.save_model(model, path, W2A2, pack=True)
    meta = io.read_metadata(path)
    assert json.loads(meta["hparams"])["share_qv_quantizer"] is True
    names = [row[0] for row in json.loads(meta["layers"])["rows"]]
    assert any(n.endswith("attn.q_act") for n in names) and not any(n.endswith("v_act") for n in names)
    loaded = io.load_model_file(path)
    assert loaded.hparams["share_qv_quantizer"] is True
    assert isinstance(_attn(loaded).q_act, PackedActQuant) and not hasattr(_attn(loaded), "v_act")
    x = torch.rand(1, 3, 13, 11)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    report = model_info(str(path))
    assert report["v_quantizer"] == "shared with q" and report["hparams"]["share_qv_quantizer"] is True
    default = tmp_path / "own.safetensors"
    io.save_model(_qat(share=False), default, W2A2, pack=True)
    assert model_info(str(default))["v_quantizer"] == "own"
    shown = run_cli("info", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "attention v quantizer" in shown.stdout and "shared with q" in shown.stdout


def test_shared_quantizer_does_not_count_the_q_matmul_twice() -> None:
    torch.manual_seed(0)
    shared = build_model("swinir-s", share_qv_quantizer=True, **TINY)
    separate = build_model("swinir-s", **TINY)
    a, b = count_macs(shared, (1, 3, 16, 16)), count_macs(separate, (1, 3, 16, 16))
    assert a["matmul"] == b["matmul"] > 0 and a["total"] == b["total"]


def test_option_reaches_the_job_and_the_model(tmp_path: Path) -> None:
    opts, _ = resolve_options({"arch": "swinir-s", "bits": 2, "share_qv_quantizer": True}, None, None)
    job = build_job(opts, run_dir=None, out=None, resume=False, device="cpu")
    assert job.share_qv_quantizer is True
    model = build_initial_model(QuantizeJob(arch="swinir-s", scale=2, quant=W2A2, train=TrainConfig(),
                                            blocks=1, share_qv_quantizer=True))
    assert model.hparams["share_qv_quantizer"] is True and "depths" in model.hparams
    config = tmp_path / "c.yaml"
    config.write_text("arch: swinir-s\nbits: 2\nshare-qv-quantizer: true\n")
    opts, _ = resolve_options({}, config, None)
    assert build_job(opts, run_dir=None, out=None, resume=False, device="cpu").share_qv_quantizer is True
    # an FP safetensors --init (whose own hparams are used) is rebuilt sharing, weights unchanged
    torch.manual_seed(1)
    fp = build_model("swinir-s", **TINY)
    init = tmp_path / "fp.safetensors"
    io.save_model(fp, init)
    job = QuantizeJob(arch="swinir-s", scale=2, quant=W2A2, train=TrainConfig(), init=str(init),
                      share_qv_quantizer=True)
    rebuilt = build_initial_model(job)
    assert rebuilt.hparams["share_qv_quantizer"] is True
    assert all(torch.equal(v, fp.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    with pytest.raises(ConfigError, match="share_qv_quantizer"):
        build_initial_model(QuantizeJob(arch="imdn", scale=4, quant=W2A2, train=TrainConfig(),
                                        share_qv_quantizer=True))


# ------------------------------------------------------------------------------ stochastic depth
def test_drop_path_is_identity_in_eval_and_per_sample_in_training() -> None:
    x = torch.rand(4000, 3, 2) + 0.5
    drop = DropPath(0.25)
    assert drop.eval()(x) is x and DropPath(0.0).train()(x) is x
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = (y != 0).flatten(1)
    assert (kept.all(1) | ~kept.any(1)).all()  # a whole sample is kept or dropped
    keep = kept.all(1)
    torch.testing.assert_close(y[keep], x[keep] / 0.75)  # kept samples scaled by 1/keep
    assert abs(keep.float().mean().item() - 0.75) < 0.03
    with pytest.raises(ConfigError):
        DropPath(1.0)


def test_swinir_drop_path_rates_and_modes() -> None:
    torch.manual_seed(0)
    model = build_model("swinir-s", upscale=2, embed_dim=12, depths=[2, 3], num_heads=[2, 2], window_size=4)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        ref_eval, ref_train = model.eval()(x), model.train()(x)
        model.set_drop_path(0.1)
        rates = [blk.drop_path.drop_prob for layer in model.layers for blk in layer.residual_group.blocks]
        assert rates == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
        assert torch.equal(model.eval()(x), ref_eval)  # identity in eval mode
        model.train()
        torch.manual_seed(3)
        outs = [model(x) for _ in range(8)]
        assert any(not torch.equal(o, ref_train) for o in outs)  # active in training
        model.set_drop_path(0.0)
        assert torch.equal(model(x), ref_train)
    assert "drop_path" not in "".join(model.state_dict())  # no state: files are unchanged


def test_drop_path_rate_option_presets_and_validation() -> None:
    for name in list_presets():
        rate = load_preset(name).get("drop_path_rate", 0.0)
        is_swin = load_preset(name)["arch"] == "swinir-s"
        assert rate == (0.1 if is_swin else 0.0), name
    opts, _ = resolve_options({"arch": "swinir-s", "bits": 2}, None, None)  # auto preset swinir-s_x4_w2a2
    assert build_job(opts, run_dir=None, out=None, resume=False, device="cpu").train.drop_path_rate == 0.1
    opts, _ = resolve_options({"arch": "swinir-s", "bits": 2, "drop_path_rate": 0.0}, None, None)
    assert build_job(opts, run_dir=None, out=None, resume=False, device="cpu").train.drop_path_rate == 0.0
    assert TrainConfig().drop_path_rate == 0.0
    with pytest.raises(ConfigError, match="drop_path_rate"):
        TrainConfig(drop_path_rate=1.0)


def test_training_run_applies_and_records_drop_path(tmp_path: Path, tiny_train_dir: Path) -> None:
    train = TrainConfig(iters=2, batch_size=2, patch_size=32, val_every=0, save_every=2, log_every=1,
                        train_data=(str(tiny_train_dir),), val_dataset="", drop_path_rate=0.1)
    job = QuantizeJob(arch="swinir-s", scale=4, quant=W2A2, train=train, blocks=2, run_dir=tmp_path / "r",
                      share_qv_quantizer=True)
    summary = run_quantize(job)
    extra = json.loads(io.read_metadata(Path(summary["out"]))["extra"])
    assert extra["drop_path_rate"] == 0.1
    assert json.loads(io.read_metadata(Path(summary["out"]))["hparams"])["share_qv_quantizer"] is True
    with pytest.raises(ConfigError, match="stochastic depth"):
        run_quantize(QuantizeJob(arch="quantsr-c", scale=4, quant=W2A2, train=train, blocks=1,
                                 run_dir=tmp_path / "c"))

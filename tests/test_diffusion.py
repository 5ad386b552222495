"""Tests of the QArtSR diffusion engine (quantsr_cli.diffusion): fast, CPU, tiny models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from quantsr_cli.diffusion.ckpt import load_model, save_model
from quantsr_cli.diffusion.losses import STANDIN_NAME, make_perceptual
from quantsr_cli.diffusion.pipeline import QArtSRConfig, run_lsq, run_ptq_minmax, run_qartsr
from quantsr_cli.diffusion.qlayers import ActPoint, QuantConv2d, QuantLinear
from quantsr_cli.diffusion.qmodel import (QuantSpec, assign_modules, calibrate, changed_originals, dequantize_model,
                                          finetune_parameters, quant_layers, quantize_model, set_quant_enabled,
                                          snapshot_original)
from quantsr_cli.diffusion.quantizers import LBQuantizer, LSQQuantizer
from quantsr_cli.diffusion.stages import CalibData, rpq_schedule, run_rpq
from quantsr_cli.diffusion.trq import measure_latent_error, retrain_timestep, select_timestep, timestep_sweep
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.models.onestep import alpha_bar, amplification_factor, x0_from_eps

DATA = Path(os.environ.get("QUANTSR_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))
TINY = dict(vae_channels=(8, 16), unet_channels=(16, 32), attn_levels=(1,), heads=2, context_dim=16, context_len=4)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("osd-sr-tiny", **TINY).eval()


def _data(n: int = 8, lr_size: int = 4, bs: int = 4) -> CalibData:
    g = torch.Generator().manual_seed(1)
    return CalibData(torch.rand(n, 3, lr_size, lr_size, generator=g),
                     torch.rand(n, 3, 4 * lr_size, 4 * lr_size, generator=g), batch_size=bs)


# ----------------------------------------------------------------------------- schedule / TRQ factor
@pytest.mark.parametrize("t,expected,tol", [(999, 14.6, 0.05), (499, 1.61, 0.005), (249, 0.69, 0.005),
                                            (1, 0.041, 0.0005)])
def test_amplification_factor(t, expected, tol):
    assert amplification_factor(t) == pytest.approx(expected, abs=tol)


def test_schedule_values_and_x0_inverse():
    assert alpha_bar(999) == pytest.approx(0.00466, abs=2e-5)
    assert alpha_bar(0) == pytest.approx(1 - 0.00085, abs=1e-9)
    z0, eps = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for t in (1, 499, 999):
        zt = alpha_bar(t) ** 0.5 * z0 + (1 - alpha_bar(t)) ** 0.5 * eps
        assert torch.allclose(x0_from_eps(zt, eps, t), z0, atol=1e-9)
    with pytest.raises(ConfigError):
        alpha_bar(1000)


def test_schedule_matches_diffusers_when_installed():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for t in (1, 499, 999):
        assert float(sched.alphas_cumprod[t]) == pytest.approx(alpha_bar(t), rel=1e-5)


# ----------------------------------------------------------------------------- quantizers
def test_lbq_levels_and_export():
    w = torch.randn(6, 5, 3, 3)
    q = LBQuantizer(2, 6, 0)
    q.init_from_tensor(w)
    out = q(w)
    for c in range(6):
        assert out[c].unique().numel() <= 4
    codes, scale, zero = q.export(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 3
    assert torch.allclose(scale[:, None, None, None] * (codes.float() - zero[:, None, None, None]), out, atol=1e-6)


def test_lsq_weight_signed_and_act_unsigned():
    q = LSQQuantizer(4, 3, 0, signed=True)
    q.init_from_tensor(torch.randn(3, 8))
    assert (q.qmin, q.qmax) == (-8, 7)
    a = LSQQuantizer(2, 1, None, signed=False)
    a.init_range(torch.tensor(-1.0), torch.tensor(2.0))
    with torch.no_grad():
        y = a(torch.linspace(-2, 3, 101))
    assert y.unique().numel() == 4 and float(y.min()) == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- wrappers and invariants
def test_wrappers_compute_fp_when_disabled_and_keep_list():
    m = _tiny()
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        ref = m(x)
    layers = quantize_model(m, QuantSpec(w_bits=2, a_bits=2))
    assert any(isinstance(v, ActPoint) for v in layers.values())
    assert isinstance(layers["unet.out.2"], QuantConv2d) and layers["unet.out.2"].w_q.bits == 8
    assert layers["unet.down.0.res.conv1"].w_q.bits == 2
    assert isinstance(layers["unet.time_embed.0"], QuantLinear) and layers["unet.time_embed.0"].lr_u is None
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    assert all(not p.requires_grad for n, p in m.named_parameters() if n.endswith(("weight", "bias")))


def test_original_weights_bit_identical_after_calibration_and_training():
    m = _tiny()
    snap = snapshot_original(m)
    data = _data()
    cfg = QArtSRConfig(w_bits=2, a_bits=2, rpq_iters=11, et_iters=2, calib_batches=2, perceptual="standin")
    res = run_qartsr(m, cfg, data)
    assert changed_originals(m, snap) == []  # the input model is untouched
    assert changed_originals(res.model, snapshot_original(res.fp_model)) == []  # wrapped originals intact
    assert changed_originals(res.model, snap) == []
    before = _tiny()
    quantize_model(before, cfg.quant_spec())
    calibrate(before, data.calibration_batches(2))
    moved = [not torch.equal(a, b) for a, b in zip(finetune_parameters(before), finetune_parameters(res.model))]
    assert any(moved)  # the finetuning parameters did train
    assert res.report["perceptual"] == STANDIN_NAME


def test_rpq_schedule_orders():
    assert rpq_schedule(3, "reverse") == [(2, [2]), (1, [1, 2]), (0, [0, 1, 2])]
    assert rpq_schedule(3, "forward") == [(0, [0]), (1, [0, 1]), (2, [0, 1, 2])]
    with pytest.raises(ConfigError):
        rpq_schedule(3, "sideways")


@pytest.mark.parametrize("order", ["reverse", "forward"])
def test_rpq_visits_modules_in_order_and_enables_the_right_ones(order):
    fp = _tiny()
    qm = copy.deepcopy(fp)
    quantize_model(qm, QuantSpec())
    data = _data()
    calibrate(qm, data.calibration_batches(1))
    chain = [(c,) if isinstance(c, str) else tuple(c) for c in qm.rpq_modules()]
    owned = assign_modules(qm, chain)
    seen: list[tuple[str, set[str]]] = []

    def spy(rec):
        enabled = {n for n, layer in quant_layers(qm).items() if layer.quant_enabled}
        seen.append((rec["module"], enabled))

    hist = run_rpq(qm, fp, data, iters=len(chain), order=order, log=spy, log_every=1)
    names = ["|".join(c) for c in chain]
    expected = names[::-1] if order == "reverse" else names
    assert [h["module"] for h in hist] == expected
    assert [s[0] for s in seen] == expected
    for (k, active), (_, enabled) in zip(rpq_schedule(len(chain), order), seen):
        assert enabled == {n for i in active for n in owned[i]}


def test_assign_modules_rejects_uncovered_layers():
    m = _tiny()
    quantize_model(m, QuantSpec())
    with pytest.raises(ConfigError):
        assign_modules(m, ["vae.encoder", "unet"])


def test_baselines_and_dequantize_merges_lora():
    m, data = _tiny(), _data()
    ptq = run_ptq_minmax(m, 4, 4, data, calib_batches=1)
    assert all(layer.quant_enabled for layer in quant_layers(ptq.model).values())
    lsq = run_lsq(m, QArtSRConfig(rpq_iters=1, et_iters=1, calib_batches=1), data)
    assert isinstance(lsq.model.get_submodule("unet.down.0.res.conv1").w_q, LSQQuantizer)
    layer = quant_layers(lsq.model)["unet.down.0.res.conv1"]
    with torch.no_grad():
        layer.lora_b.normal_()
    set_quant_enabled(lsq.model, False)
    x = torch.rand(1, 3, 4, 4)
    plain = dequantize_model(lsq.model)
    assert not quant_layers(plain)
    with torch.no_grad():
        assert torch.allclose(plain(x), lsq.model(x), atol=1e-5)


def test_trq_retrain_and_latent_error():
    m, data = _tiny(), _data()
    r = retrain_timestep(m, 249, data, iters=2)
    assert r.timestep == 249 and r.hparams["timestep"] == 249 and not quant_layers(r) and m.timestep == 999
    row = measure_latent_error(r, QuantSpec(w_bits=2, a_bits=2), data, calib_batches=1, eval_batches=1)
    assert row["eps_rmse"] > 0
    assert row["zh_rmse"] == pytest.approx(row["amplification"] * row["eps_rmse"], rel=1e-3)
    assert "image_psnr_vs_ref" not in row
    # against itself as the reference, the end-to-end PSNR is the quantization-only PSNR
    own = measure_latent_error(r, QuantSpec(w_bits=2, a_bits=2), data, calib_batches=1, eval_batches=1, reference=r)
    assert own["image_psnr_vs_ref"] == pytest.approx(own["image_psnr_vs_fp"], abs=1e-3)


def test_trq_default_target_distils_the_fp_model():
    """The library default is ``fp`` like the CLI: at the model's own T the student starts equal to its
    teacher (LoRA B = 0), so distillation has zero loss and changes nothing, while ``gt`` moves it."""
    m, data = _tiny(), _data()
    x = torch.rand(2, 3, 4, 4)
    fp_model, gt_model = retrain_timestep(m, 999, data, iters=3), retrain_timestep(m, 999, data, iters=3, target="gt")
    with torch.no_grad():
        ref, fp, gt = m(x), fp_model(x), gt_model(x)
    assert torch.allclose(fp, ref, atol=1e-6)
    assert (gt - ref).abs().max() > 1e-4
    no_hr = CalibData(data.lr, None, batch_size=4)
    retrain_timestep(m, 499, no_hr, iters=1)  # the default needs no HR
    with pytest.raises(ValueError, match="needs HR"):
        retrain_timestep(m, 499, no_hr, iters=1, target="gt")
    with pytest.raises(ValueError, match="target="):
        retrain_timestep(m, 499, data, iters=1, target="hr")
    with pytest.raises(ConfigError, match="trq_target"):
        QArtSRConfig(trq_target="auto")


def test_timestep_sweep_keeps_the_original_timestep_unretrained():
    m, data = _tiny(), _data()
    rows, models = timestep_sweep(m, [999, 249], QuantSpec(w_bits=4, a_bits=4), data, retrain_iters=1)
    assert [r["timestep"] for r in rows] == [999, 249] and models[999].timestep == 999
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(models[999](x), m(x))  # T=999 is the model itself, not a retrained copy
    assert all("image_psnr_vs_ref" in r for r in rows)
    assert select_timestep(rows) in (999, 249)


def test_select_timestep_scores_end_to_end_not_latent_error():
    rows = [{"timestep": 999, "zh_rmse": 0.47, "image_psnr_vs_ref": 43.3},
            {"timestep": 1, "zh_rmse": 0.02, "image_psnr_vs_ref": 14.2},  # smallest latent error, ruined model
            {"timestep": 899, "zh_rmse": 0.36, "image_psnr_vs_ref": 42.0}]
    assert select_timestep(rows) == 999
    assert select_timestep([{"timestep": 499, "image_psnr_vs_ref": 30.0},
                            {"timestep": 749, "image_psnr_vs_ref": 30.0}]) == 749  # tie: the larger T
    with pytest.raises(ValueError, match="reference"):
        select_timestep([{"timestep": 1, "zh_rmse": 0.1}])
    with pytest.raises(ValueError):
        select_timestep([])


def test_checkpoint_round_trip(tmp_path):
    m, data = _tiny(), _data()
    x = torch.rand(1, 3, 4, 4)
    path = save_model(m, tmp_path / "fp.safetensors")
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), m(x))
    res = run_ptq_minmax(m, 2, 2, data, calib_batches=1)
    qpath = save_model(res.model, tmp_path / "q.safetensors", spec=res.spec)
    with torch.no_grad():
        assert torch.equal(load_model(qpath)(x), res.model(x))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "bad.safetensors")


def test_perceptual_is_pluggable_and_named():
    p = make_perceptual("standin")
    assert "not LPIPS" in p.name
    a = torch.rand(1, 3, 16, 16)
    assert float(p(a, a)) == pytest.approx(0.0, abs=1e-5) and float(p(a, 1 - a)) > 0.1
    assert make_perceptual("auto").name in (STANDIN_NAME, "lpips-vgg")
    with pytest.raises(ConfigError):
        make_perceptual("vgg-ish")


def test_imresize_matches_benchmark_lr():
    from quantsr_cli.data import BenchmarkDataset, matlab_lr

    if not (DATA / "benchmarks" / "Set5").is_dir():
        pytest.skip(f"benchmark data not found under {DATA}")
    _, lr, hr = BenchmarkDataset(DATA / "benchmarks" / "Set5", 4)[0]
    diff = matlab_lr((hr[0] * 255).round().int(), 4) - (lr[0] * 255).round().int()
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() < 0.01


# ----------------------------------------------------------------------------- diffusers adapter
def _tiny_diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    return unet.eval(), vae.eval()


def test_diffusers_adapter_wiring():
    from quantsr_cli.diffusion.diffusers_adapter import OSEDiffAdapter

    unet, vae = _tiny_diffusers()
    prompt = torch.randn(1, 5, 32)
    z = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 999)
    with torch.no_grad():
        eps_ref = unet(z, t, encoder_hidden_states=prompt.expand(2, -1, -1)).sample
    m = OSEDiffAdapter(unet, vae, prompt).eval()
    with torch.no_grad():
        assert torch.allclose(m.denoise(z), eps_ref, atol=1e-5)  # our attention processor == diffusers'
    fp = copy.deepcopy(m)
    snap = snapshot_original(m)
    layers = quantize_model(m, QuantSpec())
    points = [n for n, v in layers.items() if isinstance(v, ActPoint)]
    assert any(n.endswith("attn2.k_act") for n in points) and any(n.startswith("vae.") for n in points)
    owned = assign_modules(m, m.rpq_modules())
    assert all(owned) and owned[-1] and "unet.conv_out" in owned[-2]
    assert layers["unet.conv_out"].w_q.bits == 8 and layers["vae.decoder.conv_out"].w_q.bits == 8
    data = CalibData(torch.rand(4, 3, 8, 8), batch_size=2)
    calibrate(m, data.calibration_batches(1))
    assert all(layer.ready for layer in layers.values())
    hist = run_rpq(m, fp, data, iters=2)  # visits every module; only the first two train
    assert hist[0]["module"] == "vae.post_quant_conv|vae.decoder" and hist[-1]["module"] == "vae.encoder|vae.quant_conv"
    assert changed_originals(m, snap) == []
    with torch.no_grad():
        out = m(torch.rand(1, 3, 8, 8))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_merge_peft_lora_on_diffusers_keys():
    from quantsr_cli.diffusion.diffusers_adapter import merge_osediff_lora

    unet, vae = _tiny_diffusers()
    w_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    w_c = unet.down_blocks[0].resnets[0].conv1.weight.detach().clone()
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    ca, cb = torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1)
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ckpt = {"rank_unet": 4, "rank_vae": 4, "state_dict_vae": {},
            "state_dict_unet": {f"{p}.lora_A.default_encoder.weight": a, f"{p}.lora_B.default_encoder.weight": b,
                                "down_blocks.0.resnets.0.conv1.lora_A.default_encoder.weight": ca,
                                "down_blocks.0.resnets.0.conv1.lora_B.default_encoder.weight": cb,
                                "conv_in.base_layer.bias": torch.zeros(32)}}
    changed = merge_osediff_lora(unet, vae, ckpt)
    assert len(changed) == 3
    assert torch.allclose(unet.get_submodule(p).weight, w_q + 2.0 * b @ a, atol=1e-5)
    delta = (cb.flatten(1) @ ca.flatten(1)).reshape(w_c.shape)
    assert torch.allclose(unet.down_blocks[0].resnets[0].conv1.weight, w_c + 2.0 * delta, atol=1e-4)
    assert torch.equal(unet.conv_in.bias, torch.zeros(32))
    with pytest.raises(CheckpointError):
        merge_osediff_lora(unet, vae, {"rank_unet": 4, "rank_vae": 4, "state_dict_vae": {},
                                       "state_dict_unet": {"nope.lora_A.x.weight": a}})

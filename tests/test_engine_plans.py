"""Whole-model engine plans (IMDN, QuantSR-C) and the layer-by-layer engine path, run on the CPU shim.

The engine's kernels run through their launch plans in the g++-compiled shim (``tests/kernel_shim``) on CPU
tensors; the full-precision parts run in torch. The outputs are compared with the ``torch`` backend (the
reference): in float32 the engine differs only where a float rounding difference moves an activation code
across a rounding edge (integer accumulation vs float32 convolution; the epilogue multiplies by 1/step), in
float16 also by the float16 glue. Both are measured as PSNR against the reference on a [0, 1] image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from quantsr_cli.backends import cupy_backend as cb
from quantsr_cli.backends import cupy_plan as plan
from quantsr_cli.backends import use_backend
from quantsr_cli.backends.engine_layers import EngineOps, default_spec, prepare_tc, tc_unsupported
from quantsr_cli.backends.engine_plans import PRECISIONS, ImdnPlan, ResNetPlan, build_plan
from quantsr_cli.config import QuantConfig
from quantsr_cli.packing.convert import to_packed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernel_shim"))
from kernel_harness import shim_exe_path, shim_run  # noqa: E402

models = pytest.importorskip("quantsr_cli.models")
quant = pytest.importorskip("quantsr_cli.quant")


def shim_launcher(tmp: Path):  # noqa: ANN201 - an engine ``launch`` running in the CPU shim
    def run(lp: plan.Launch, device: torch.device) -> None:
        args, tensors = [], []
        for kind, value in lp.args:
            if kind == "P" and value is not None:
                assert value.is_contiguous() or value.dim() == 4, "engine buffers are dense"
                span = 1 + sum((n - 1) * st for n, st in zip(value.shape, value.stride()))
                mem = value if value.is_contiguous() else value.as_strided((span,), (1,))
                args.append(("P", mem.detach().numpy()))
                tensors.append(value)
            else:
                args.append((kind, value))
                if kind == "P":
                    tensors.append(None)
        outs = shim_run(shim_exe_path(lp.defines), plan.Launch(lp.kernel, lp.grid, lp.block, tuple(args), lp.smem,
                                                                lp.defines), tmp)
        for t, out in zip(tensors, outs):
            if t is not None and t.is_contiguous():
                t.copy_(torch.from_numpy(out.copy()).view(t.dtype).view(t.shape))

    return run


def shim_ops(tmp: Path) -> EngineOps:
    return EngineOps(shim_launcher(tmp), lambda spec, device: 3, default_spec)


def packed(arch: str, hp: dict, method: str = "rbd", bits: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = quant.quantize_(models.build_model(arch, **hp), QuantConfig(method, bits, bits))
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    return use_backend(to_packed(model.eval()), "torch")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.detach().double() - b.detach().double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize(("prec", "floor"), [("fp32", 100.0), ("mixed", 70.0), ("fp16", 42.0)])
def test_imdn_plan_matches_reference(tmp_path: Path, prec: str, floor: float) -> None:
    model = packed("imdn", {"upscale": 2, "num_feat": 64, "num_modules": 2})
    x = torch.rand(1, 3, 11, 20)
    with torch.no_grad():
        ref = model(x)
    p = ImdnPlan(model, torch.device("cpu"), PRECISIONS[prec])
    got = p.finish(p.forward(shim_ops(tmp_path), x))
    assert got.shape == ref.shape == (1, 3, 22, 40) and got.dtype == torch.float32
    assert psnr(got, ref) >= floor, psnr(got, ref)
    if prec == "fp32":  # most pixels agree to float32 rounding
        assert float(((got - ref).abs() < 1e-4).float().mean()) > 0.95


@pytest.mark.parametrize(("prec", "floor"), [("fp32", 100.0), ("mixed", 75.0), ("fp16", 55.0)])
def test_resnet_plan_matches_reference_with_a_skipped_block(tmp_path: Path, prec: str, floor: float) -> None:
    model = packed("quantsr-c", {"upscale": 2, "num_block": 4, "num_feat": 16}, bits=2)
    model.body[1].skip = True
    with torch.no_grad():
        model.body[2].learnable_shortcut.fill_(0.75)
        model.body[2].res_scale = 0.5
    x = torch.rand(2, 3, 9, 13)
    with torch.no_grad():
        ref = model(x)
    p = ResNetPlan(model, torch.device("cpu"), PRECISIONS[prec])
    got = p.finish(p.forward(shim_ops(tmp_path), x))
    assert got.shape == ref.shape
    assert psnr(got, ref) >= floor, psnr(got, ref)


def test_layer_by_layer_engine_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cupy_backend.engine_forward (quantize kernel with strides -> qsr_conv_tc, float32 out) per layer."""
    monkeypatch.setattr(cb, "launch", shim_launcher(tmp_path))
    model = packed("quantsr-c", {"upscale": 2, "num_block": 2, "num_feat": 16})
    layer = model.body[0].conv1
    assert tc_unsupported(layer) is None
    x = torch.randn(2, 16, 7, 9).contiguous(memory_format=torch.channels_last)
    want = layer.reference(x)
    got = cb.engine_forward(layer, x, ops=shim_ops(tmp_path))
    assert got.shape == want.shape
    close = (got - want).abs() <= 1e-4 * (1 + want.abs())
    assert float(close.float().mean()) > 0.98  # the rest: a code across a rounding edge (float32 sum order)


def test_plans_refuse_what_they_do_not_know() -> None:
    swin = packed("swinir-s", {"upscale": 2, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4},
                  method="dorefa")
    plan_obj, note = build_plan(swin, torch.device("cpu"), PRECISIONS["fp16"])
    assert plan_obj is None and note.startswith("layer by layer") and "not an IMDN" in note
    odd = packed("quantsr-c", {"upscale": 2, "num_block": 1, "num_feat": 24})
    assert "multiples of 16" in (tc_unsupported(odd.body[0].conv1) or "")
    plan_obj, note = build_plan(odd, torch.device("cpu"), PRECISIONS["fp16"])
    assert plan_obj is None and "multiples of 16" in note
    imdn = packed("imdn", {"upscale": 2, "num_feat": 64, "num_modules": 1})
    plan_obj, note = build_plan(imdn, torch.device("cpu"), PRECISIONS["mixed"])
    assert isinstance(plan_obj, ImdnPlan) and "glue float32, head float32, tail float16" in note


def test_prepared_layer_holds_the_folded_weights() -> None:
    model = packed("quantsr-c", {"upscale": 2, "num_block": 1, "num_feat": 16}, method="dorefa")
    conv = model.body[0].conv1
    layer = prepare_tc(conv, torch.device("cpu"))
    z2 = plan.zero2_of(conv.w_zero, conv.w_bits)
    assert torch.equal(layer.wq.to(torch.int16), 2 * conv.codes().to(torch.int16) - z2)
    w = conv.dequantized_weight().permute(0, 2, 3, 1).reshape(16, -1).double()
    ws = (layer.scale.double() / (0.5 * float(conv.a_step))).view(-1, 1)
    assert torch.allclose(0.5 * ws * layer.wq.double(), w, rtol=1e-6, atol=1e-9)
    assert prepare_tc(conv, torch.device("cpu")) is layer  # cached until a buffer changes
    with torch.no_grad():
        conv.w_scale.mul_(2)
    assert prepare_tc(conv, torch.device("cpu")) is not layer


def test_runner_self_check_keeps_a_good_engine_and_drops_a_broken_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsr_cli.backends import engine_runtime as er

    monkeypatch.setattr(er, "_DISABLED", [])
    model = packed("quantsr-c", {"upscale": 2, "num_block": 2, "num_feat": 16})
    runner = er.EngineRunner(model, "mixed")
    runner.ops = shim_ops(tmp_path)
    runner._setup(torch.device("cpu"))
    assert isinstance(runner.plan, ResNetPlan) and "self-check" in runner.note and er.engine_disabled() is None
    broken = er.EngineRunner(model, "mixed")
    broken.ops = EngineOps(lambda lp, dev: None, lambda spec, dev: 3, default_spec)  # kernels that do nothing
    with pytest.warns(UserWarning, match="engine disabled"):
        broken._setup(torch.device("cpu"))
    assert broken.plan is None and "engine off: self-check" in broken.note
    assert er.engine_disabled() is not None  # the whole process falls back to the per-layer kernels
    again = er.EngineRunner(model, "mixed")
    again._setup(torch.device("cpu"))
    assert again.plan is None and "engine off" in again.note
    monkeypatch.setattr(er, "_DISABLED", [])
    monkeypatch.setenv("QUANTSR_ENGINE", "0")
    assert er.engine_disabled() == "QUANTSR_ENGINE=0"

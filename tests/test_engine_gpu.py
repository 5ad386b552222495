"""The engine on a real GPU (marker ``gpu``; skipped without CUDA + cupy): kernels at real layer sizes against
an integer reference, fused plans and the layer-by-layer path against the torch backend, CUDA-graph replay
against eager runs. The CPU-shim tests (test_engine_kernels.py, test_engine_plans.py) check the same logic
bit for bit; here the hardware instructions (ldmatrix, cp.async, mma, binary16 cvt) are what is tested.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsr_cli.backends import cupy_backend as cb
from quantsr_cli.backends import engine_plan as ep
from quantsr_cli.errors import BackendUnavailableError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _gpu() -> None:
    try:
        cb.check_available()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the engine needs sm_80 or newer")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def _to_cuda(epi: ep.Epilogue) -> ep.Epilogue:
    def t(a: object) -> object:
        return torch.from_numpy(a).cuda() if isinstance(a, np.ndarray) else a

    qs = {k: None if q is None else ep.CodeOut(t(q.dst), q.ld, q.off, q.c0, q.c1, q.step, q.qmin, q.qmax, t(q.shift))
          for k, q in (("q1", epi.q1), ("q2", epi.q2))}
    return ep.Epilogue(t(epi.scale), t(epi.bias), epi.act, epi.slope, t(epi.res), epi.res_ld, epi.res_off,
                       epi.res_coef, t(epi.yf), epi.yf_ld, epi.yf_off, epi.yf_c0, epi.yf_c1, **qs)


@pytest.mark.parametrize("wm_warps", [(2, 4), (4, 4), (2, 8), (4, 2)], ids=lambda t: f"wm{t[0]}w{t[1]}")
@pytest.mark.parametrize("kind", ["full", "imdn_split", "two_codes"])
def test_conv_tc_real_sizes(kind: str, wm_warps: tuple[int, int]) -> None:
    from test_engine_kernels import make_conv_case, reference
    from quantsr_cli.backends.engine_runtime import launch, max_ctas

    wm, warps = wm_warps
    c, o, ks = (48, 64, 3) if kind == "imdn_split" else (64, 64, 3 if kind == "full" else 1)
    spec = ep.TcSpec(c, ks, 64, warps, kind == "full", wm=wm)
    d = make_conv_case(spec, 2, 75, 131, o, kind, seed=11)
    want = reference(spec, d)
    epi = _to_cuda(d["epi"])
    codes, wq = torch.from_numpy(d["codes"]).cuda(), torch.from_numpy(d["wq"]).cuda()
    launch(ep.plan_conv_tc(spec, codes, wq, epi, n=2, h=75, w=131, o=o, max_ctas=max_ctas(spec, codes.device)),
           codes.device)
    torch.cuda.synchronize()
    if epi.yf is not None:
        got = epi.yf.cpu().numpy()[:, epi.yf_off:epi.yf_off + epi.yf_c1 - epi.yf_c0].astype(np.float64)
        ref = want["yf"].astype(np.float64)
        tol = 1e-3 * (1 + np.abs(ref))  # binary16 output: one ulp; FMA contraction moves float32 by an ulp
        assert (np.abs(got - ref) <= tol).all(), float(np.abs(got - ref).max())
    for key in ("q1", "q2"):
        q = getattr(epi, key)
        if q is not None:
            raw = q.dst.cpu().numpy()[:, q.off:q.off + q.c1 - q.c0]
            got = raw.view(np.int8 if q.qmin < 0 else np.uint8).astype(np.int64)
            diff = np.abs(got - want[key])
            assert diff.max() <= 1 and diff.mean() < 1e-4, (diff.max(), diff.mean())


def _packed(arch: str, hp: dict, bits: int = 4) -> torch.nn.Module:
    from test_engine_plans import packed

    return packed(arch, hp, bits=bits).cuda()


@pytest.mark.parametrize("precision", ["mixed", "fp16", "fp32"])
def test_backend_cupy_matches_torch_on_real_models(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_engine_plans import psnr
    from quantsr_cli.backends import use_backend
    from quantsr_cli.backends.engine_runtime import runner_of
    from quantsr_cli.engine.modelio import load_model

    monkeypatch.setenv("QUANTSR_ENGINE_PRECISION", precision)
    floor = {"fp32": 70.0, "mixed": 60.0, "fp16": 40.0}[precision]
    for name in ("default", "default-w2"):
        model = load_model(name, device="cuda").model
        x = torch.rand(2, 3, 67, 93, device="cuda")
        with torch.no_grad():
            ref = use_backend(model, "torch")(x)
            use_backend(model, "cupy")
            first = model(x)   # eager (tunes, captures)
            second = model(x)  # CUDA graph replay
        assert "fused ImdnPlan" in runner_of(model).note
        assert torch.equal(first, second)
        assert psnr(second.clamp(0, 1), ref.clamp(0, 1)) >= floor, (name, psnr(second, ref))
        use_backend(model, "torch")
        assert runner_of(model) is None


def test_resnet_plan_and_layer_path_on_gpu() -> None:
    from test_engine_plans import psnr
    from quantsr_cli.backends import use_backend
    from quantsr_cli.backends.engine_runtime import runner_of

    model = _packed("quantsr-c", {"upscale": 4, "num_block": 4, "num_feat": 64}, bits=2)
    x = torch.rand(1, 3, 50, 70, device="cuda")
    with torch.no_grad():
        ref = model(x)
        use_backend(model, "cupy")
        got = model(x)
        again = model(x)
    assert "fused ResNetPlan" in runner_of(model).note and torch.equal(got, again)
    assert psnr(got, ref) >= 60.0
    layer = model.body[0].conv1  # the layer-by-layer engine path on the same layer
    h = torch.randn(1, 64, 33, 47, device="cuda").contiguous(memory_format=torch.channels_last)
    close = (cb.engine_forward(layer, h) - layer.reference(h)).abs() <= 1e-4 * (1 + layer.reference(h).abs())
    assert float(close.float().mean()) > 0.98


def test_generic_models_run_layer_by_layer_with_graphs() -> None:
    from quantsr_cli.backends import use_backend
    from quantsr_cli.backends.engine_runtime import runner_of

    model = _packed("swinir-s", {"upscale": 2, "embed_dim": 16, "depths": [2], "num_heads": [2], "window_size": 4})
    x = torch.rand(1, 3, 16, 24, device="cuda")
    with torch.no_grad():
        ref = model(x)
        use_backend(model, "cupy")
        got = model(x)
        again = model(x)
    assert runner_of(model).note.startswith("layer by layer")
    assert torch.equal(got, again)
    assert float((got - ref).abs().max()) < 0.05

"""Export to ONNX / OpenVINO IR and the onnxruntime / openvino backends.

Properties checked: the exported graph carries our exact quantizers (steps, zero points, clamps, weight
codes), running it gives the torch backend's output (float32 rounding and rare code flips only), the
OpenVINO CPU plugin runs every quantized convolution in u8 (its runtime precision, not only the output),
exports are cached by model hash, and the bundled models keep their PSNR within 0.01 dB (slow).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from quantsr_cli.backends import BACKENDS, available_backends, backend_of, resolve_backend, use_backend

RUNTIMES = tuple(n for n, spec in BACKENDS.items() if spec.any_model)
from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import BackendUnavailableError
from quantsr_cli.packing.convert import to_packed
from quantsr_cli.packing.modules import PackedConv2d, PackedModule

from tests.conftest import calibrated_qat, run_cli

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
has_ort = importlib.util.find_spec("onnxruntime") is not None
has_ov = importlib.util.find_spec("openvino") is not None
needs_ort = pytest.mark.skipif(not has_ort, reason="onnxruntime not installed (pip install 'quantsr[cpu-fast]')")
needs_ov = pytest.mark.skipif(not has_ov, reason="openvino not installed (pip install 'quantsr[cpu-fast]')")

TINY = {
    "imdn": {"upscale": 2, "num_feat": 16, "num_modules": 2},
    "quantsr-c": {"upscale": 2, "num_block": 2, "num_feat": 16},
    "swinir-s": {"upscale": 2, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4},
}


def qat_model(arch: str, method: str, w_bits: int, a_bits: int, seed: int = 0) -> nn.Module:
    """A tiny model quantized and calibrated on one random batch, with non-trivial shifts (eval mode)."""
    return calibrated_qat(arch, TINY[arch], method, w_bits, a_bits, seed)


def packed_model(arch: str, method: str, w_bits: int, a_bits: int) -> nn.Module:
    return use_backend(to_packed(qat_model(arch, method, w_bits, a_bits)), "torch")


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding plus rare code flips (a float difference on a rounding boundary moves
    one activation code by one step; the change spreads over that code's receptive field)."""
    diff = (got - ref).abs()
    assert got.shape == ref.shape
    assert float(diff.mean()) < 1e-3 and float((diff > 1 / 255).float().mean()) < 0.02, float(diff.max())


CASES = [("imdn", "rbd", 4, 4), ("imdn", "lsq", 2, 2), ("quantsr-c", "dorefa", 4, 4), ("quantsr-c", "pams", 8, 8),
         ("swinir-s", "rlq", 2, 8)]


@pytest.mark.parametrize("arch,method,w_bits,a_bits", CASES)
def test_runtimes_equal_torch_backend(arch: str, method: str, w_bits: int, a_bits: int) -> None:
    model = packed_model(arch, method, w_bits, a_bits)
    x = torch.rand(1, 3, 13, 17)  # not the traced size, not a window multiple: dynamic H/W
    with torch.no_grad():
        ref = model(x)
        for name in [r for r in RUNTIMES if r in available_backends()]:
            use_backend(model, name)
            assert backend_of(model) == name
            close(model(x), ref)
            close(model(torch.cat([x, x.flip(-1)])), torch.cat([ref, model(x.flip(-1))]))  # batch 2
        use_backend(model, "torch")
        assert "forward" not in model.__dict__  # the runtime forward is removed again
        assert torch.equal(model(x), ref)


def test_onnx_graph_carries_our_quantizers() -> None:
    from quantsr_cli.backends.export_onnx import trace_onnx

    model = packed_model("imdn", "lsq", 2, 2)
    proto = trace_onnx(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    nodes = list(proto.graph.node)
    layers = [m for m in model.modules() if isinstance(m, PackedConv2d)]
    quantize = [n for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(layers) and proto.opset_import[0].version >= 21
    steps = sorted(float(m.a_step) for m in layers)
    assert sorted(float(inits[n.input[1]]) for n in quantize) == pytest.approx(steps, rel=0, abs=0)
    zps = sorted(int(inits[n.input[2]]) for n in quantize)
    assert zps == sorted(-m.a_qmin for m in layers)
    weights = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].ndim == 4]
    # every output channel's integer weights u - zero, in some DequantizeLinear (split convs are sliced)
    got = sorted(tuple(row.ravel().tolist()) for n in weights for row in inits[n.input[0]])
    want = sorted(tuple(row.ravel().tolist()) for m in layers for row in
                  m.codes().reshape(m.weight_shape[0], *m.kernel_size, -1).permute(0, 3, 1, 2).to(torch.int32)
                  - int(m.w_zero))
    assert got == want and all(inits[n.input[0]].dtype.name == "int8" for n in weights)
    # 2-bit codes: the upper clamp is in the graph (Min before the per-channel shift; Q saturates below)
    assert sum(n.op_type == "Min" for n in nodes) >= len(layers)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and dims[2].dim_param and dims[3].dim_param


@needs_ov
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (2, 2)])
def test_openvino_runs_quantized_convs_in_u8(w_bits: int, a_bits: int) -> None:
    from quantsr_cli.backends.export_openvino import compile_model, convert, runtime_precisions

    model = packed_model("imdn", "rbd", w_bits, a_bits)
    compiled = compile_model(convert(model), threads=1)
    precisions = runtime_precisions(compiled)
    n_quant = sum(isinstance(m, PackedConv2d) for m in model.modules())  # some are split in two (IMDN)
    n_float = sum(type(m) is nn.Conv2d for m in model.modules())
    float_convs = [p for p in precisions.values() if p not in ("u8", "i8")]
    assert len(float_convs) == n_float and len(precisions) >= n_quant + n_float, precisions
    x = torch.rand(1, 3, 11, 14)
    with torch.no_grad():
        ref = model(x)
    close(torch.from_numpy(compiled.create_infer_request().infer({0: x.numpy()})[0].copy()), ref)


@needs_ov
@pytest.mark.parametrize("w_bits,a_bits", [(4, 4), (2, 2)])
def test_graph_passes_keep_the_output_and_run_every_feature_map_concat_in_u8(w_bits: int, a_bits: int) -> None:
    from quantsr_cli.backends import export_openvino as eo
    from quantsr_cli.backends import openvino_passes as op

    model = packed_model("imdn", "rbd", w_bits, a_bits)  # 2 blocks
    plain, moved = eo.convert(model, passes=False), eo.convert(model, passes=False)
    counts = (op.one_pass_variance(moved), op.quantize_before_concat(moved), op.quantize_concat_inputs(moved))
    assert counts == (2, 2, 1)  # each block's variance and distillation concat; the final 2-way concat
    assert (op.one_pass_variance(moved), op.quantize_before_concat(moved), op.quantize_concat_inputs(moved)) == (0, 0, 0)
    x = torch.rand(1, 3, 13, 10)
    with torch.no_grad():
        ref = model(x)
    out = {}
    for name, graph in (("plain", plain), ("moved", moved), ("convert", eo.convert(model))):
        compiled = eo.compile_model(graph, threads=1)
        out[name] = torch.from_numpy(np.array(compiled.create_infer_request().infer({0: x.numpy()})[0]))
        feature_map_concats = [o.get_rt_info()["runtimePrecision"].astype(str)
                               for o in compiled.get_runtime_model().get_ordered_ops()
                               if o.get_rt_info()["layerType"].astype(str) == "Concatenation"
                               and o.get_output_partial_shape(0)[2] != 1]
        assert len(feature_map_concats) == 3 and (name == "plain") == ("f32" in feature_map_concats), \
            (name, feature_map_concats)
        close(out[name], ref)
    assert torch.equal(out["moved"], out["convert"])  # convert() applies exactly these passes
    close(out["moved"], out["plain"])  # float rounding of the variance only


@needs_ort
def test_fake_quant_model_exports_like_its_packed_twin() -> None:
    from quantsr_cli.backends.onnxruntime_backend import session
    from quantsr_cli.backends.export_onnx import export_onnx

    qat = qat_model("imdn", "rbd", 4, 4)
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        ref = use_backend(to_packed(qat), "torch")(x)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(qat, f"{tmp}/q.onnx")
        sess = session(f"{tmp}/q.onnx", threads=1)
        close(torch.from_numpy(sess.run(None, {"lr": x.numpy()})[0]), ref)


@needs_ort
def test_export_is_cached_by_model_hash(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from quantsr_cli.backends import export_onnx as eo
    from quantsr_cli.backends import runtime_common as rc

    monkeypatch.setenv("QUANTSR_CACHE", str(tmp_path / "cache"))

    model = packed_model("imdn", "rbd", 4, 4)
    calls = []
    real = eo.export_onnx
    monkeypatch.setattr(eo, "export_onnx", lambda m, p: (calls.append(p), real(m, p))[1])
    use_backend(model, "onnxruntime")
    use_backend(model, "torch")
    use_backend(model, "onnxruntime")
    assert len(calls) == 1 and calls[0].parent == rc.cache_dir() == tmp_path / "cache" / "export"
    h = rc.model_hash(model, "onnx")
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, PackedModule)).a_step.mul_(2)
    assert rc.model_hash(model, "onnx") != h


def test_missing_runtime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("openvino", "onnxruntime") else real(n, *a))
    assert not set(RUNTIMES) & set(available_backends())
    assert resolve_backend("auto") in ("cpu", "cupy")
    for name in RUNTIMES:
        with pytest.raises(BackendUnavailableError, match=rf"backend '{name}' cannot run here: .*quantsr\[cpu-fast\]"):
            use_backend(nn.Sequential(), name)


@pytest.mark.skipif(not has_ov, reason="openvino not installed: auto never tries a runtime")
def test_auto_falls_back_to_cpu_when_the_export_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsr_cli.backends import runtime_common as rc
    from quantsr_cli.errors import ConfigError

    def fail(*_a: object) -> None:
        raise ConfigError("cannot trace")

    monkeypatch.setattr(rc, "cache_dir", fail)
    model = packed_model("imdn", "rbd", 4, 4)
    use_backend(model, "auto")
    assert backend_of(model) in ("cpu", "cupy")
    with pytest.raises(ConfigError, match="cannot trace"):
        use_backend(model, next(r for r in RUNTIMES if r in available_backends()))


@needs_ov
def test_runtime_failure_is_one_line_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantsr_cli.backends import openvino_backend

    def crash(_model: nn.Module) -> None:
        raise RuntimeError("Exception from src/inference/src/cpp/core.cpp:112:\nplugin crashed")

    monkeypatch.setattr(openvino_backend, "exported_file", crash)
    model = packed_model("imdn", "rbd", 4, 4)
    with pytest.raises(BackendUnavailableError, match=r"^backend 'openvino' cannot run this model \(RuntimeError: "
                       r"Exception from src/inference/src/cpp/core.cpp:112:\)$"):
        use_backend(model, "openvino")
    assert backend_of(use_backend(model, "auto")) in ("cpu", "cupy") and "forward" not in model.__dict__


@pytest.mark.skipif(not (has_ov and has_ort), reason="needs onnxruntime and openvino")
def test_cli_export_writes_both_formats(tmp_path) -> None:
    from quantsr_cli.packing.io import save_model

    path = tmp_path / "tiny.safetensors"
    save_model(to_packed(qat_model("imdn", "rbd", 4, 4)), path, QuantConfig("rbd", 4, 4))
    for out in ("m.onnx", "m.xml"):
        res = run_cli("export", str(path), "-o", str(tmp_path / out), "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["max_abs_diff"] < 1e-3 and report["bytes"] > 0
    assert (tmp_path / "m.bin").is_file() and not list(tmp_path.glob(".*"))
    res = run_cli("export", str(path), "-o", str(tmp_path / "m.pt"))
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("name,floor", [("default", 31.70), ("default-w2", 31.0)])
def test_bundled_models_keep_psnr_in_every_runtime(shared_data, name: str, floor: float) -> None:
    def psnr(backend: str) -> dict[str, float]:
        res = run_cli("eval", "--model", name, "-d", "Set5", "-d", "Set14", "--backend", backend, "--json")
        assert res.returncode == 0, res.stderr
        return {k: v["psnr"] for k, v in json.loads(res.stdout)["datasets"].items()}

    ref = psnr("torch")
    assert ref["Set5"] >= floor
    for backend in [r for r in RUNTIMES if r in available_backends()]:
        got = psnr(backend)
        for dataset, value in ref.items():
            assert abs(got[dataset] - value) <= 0.01, (backend, dataset, got[dataset], value)

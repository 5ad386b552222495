"""Backends: selection, the torch reference against fake-quant QAT, and the cpu int8 path against it."""

from __future__ import annotations

import copy
import importlib.machinery
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from quantsr_cli.backends import BACKENDS, auto_backend, available_backends, backend_of, resolve_backend, use_backend
from quantsr_cli.backends import cpu
from quantsr_cli.backends.cpu import cpu_forward, layer_report, onednn_available
from quantsr_cli.errors import BackendUnavailableError, ConfigError
from quantsr_cli.packing.convert import to_packed
from quantsr_cli.packing.modules import PackedModule
from quantsr_cli.quant import METHODS
from tests.conftest import calibrated_qat


TINY = {
    "quantsr-c": {"upscale": 2, "num_block": 3, "num_feat": 16},
    "swinir-s": {"upscale": 2, "embed_dim": 12, "depths": [2], "num_heads": [2], "window_size": 4},
}
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN int8 ops")


def qat_model(arch: str, method: str, w_bits: int, a_bits: int, seed: int = 0) -> nn.Module:
    """A tiny model of ``arch`` quantized and calibrated on one random batch (eval mode)."""
    return calibrated_qat(arch, TINY[arch], method, w_bits, a_bits, seed)


def layer_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of every packed module during one forward."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out)))
        for name, m in model.named_modules()
        if isinstance(m, PackedModule)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


# --------------------------------------------------------------------------- selection
def test_backend_names() -> None:
    assert {"torch", "cpu"} <= set(available_backends())
    assert resolve_backend("torch") == "torch" and resolve_backend("cpu") == "cpu"
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("gpu")
    if "cupy" not in available_backends():
        ranked = sorted((n for n, sp in BACKENDS.items() if sp.auto_rank is not None), key=lambda n: BACKENDS[n].auto_rank)
        assert resolve_backend("auto") == next(n for n in ranked if n in available_backends()) == auto_backend()
        with pytest.raises(BackendUnavailableError, match="cupy"):
            resolve_backend("cupy")


def test_cupy_hook_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "cupy" else real_find_spec(n, *a))
    with pytest.raises(BackendUnavailableError, match="no CUDA device.*cupy package is not installed"):
        use_backend(nn.Sequential(), "cupy")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    fake = types.ModuleType("cupy")
    fake.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailableError, match="backend 'cupy' cannot run here: no CUDA device"):
        resolve_backend("cupy")
    assert resolve_backend("auto") == auto_backend() != "cupy" and "cupy" not in available_backends()


# --------------------------------------------------------------------------- torch reference == fake quant
@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("method", METHODS)
def test_reference_equals_fake_quant(arch: str, method: str) -> None:
    for w_bits, a_bits in ((2, 2), (4, 4), (8, 8), (2, 8)):
        model = qat_model(arch, method, w_bits, a_bits)
        packed = use_backend(to_packed(model), "torch")
        x = torch.rand(2, 3, 12, 18)
        with torch.no_grad():
            diff = (packed(x) - model(x)).abs().max().item()
        assert diff <= 1e-5, (arch, method, w_bits, a_bits, diff)


# --------------------------------------------------------------------------- cpu == reference
@needs_onednn
@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("method,bits", [("rbd", 4), ("rlq", 2), ("lsq", 8), ("dorefa", 2), ("dorefa", 4), ("pams", 4)])
def test_cpu_matches_reference(arch: str, method: str, bits: int) -> None:
    model = to_packed(qat_model(arch, method, bits, bits, seed=1))
    x = torch.rand(1, 3, 13, 17)
    captured = layer_io(use_backend(model, "torch"), x)
    with torch.no_grad():
        y_ref = model(x)
        for name, (inp, out) in captured.items():  # same input -> same codes -> float rounding only
            got = cpu_forward(model.get_submodule(name), inp)
            assert (got - out).abs().max().item() <= 1e-4 * max(1.0, out.abs().max().item()), name
        use_backend(model, "cpu")
        y_cpu = model(x)
    notes = layer_report(model)
    assert any(v == "cpu: oneDNN int8" for v in notes.values()), notes
    assert (y_cpu - y_ref).abs().max().item() <= 1e-4


@needs_onednn
def test_cpu_fallbacks_are_per_layer_and_exact() -> None:
    cases = {
        ("dorefa", 8, 8): "not int8",  # half-integer zero 127.5 doubles to +-255
        ("pams", 8, 8): "saturate",  # 2 * 254 * 127 > 32767 on AVX2 vpmaddubsw
        ("rbd", 4, 32): "float input",  # weight-only quantization
    }
    for (method, w_bits, a_bits), reason in cases.items():
        model = to_packed(qat_model("quantsr-c", method, w_bits, a_bits))
        x = torch.rand(1, 3, 9, 11)
        with torch.no_grad():
            y_ref = use_backend(model, "torch")(x)
            y_cpu = use_backend(model, "cpu")(x)
        notes = set(layer_report(model).values())
        assert len(notes) == 1 and reason in notes.pop(), (method, notes)
        assert (y_cpu - y_ref).abs().max().item() <= 1e-5


@needs_onednn
def test_cpu_handles_half_integer_zero_and_linear() -> None:
    model = to_packed(qat_model("swinir-s", "dorefa", 4, 4))
    notes = layer_report(use_backend(model, "cpu"))
    linear = [n for n, m in model.named_modules() if type(m).__name__ == "PackedLinear"]
    assert linear and all(notes[n] == "cpu: oneDNN int8" for n in linear)
    assert all(model.get_submodule(n).w_zero == 7.5 for n in linear)


def test_chunked_input_codes_equal_the_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "_CHUNK_BYTES", 3000)  # many slices, a ragged last one
    model = to_packed(qat_model("swinir-s", "rbd", 4, 4))
    conv = next(m for m in model.modules() if type(m).__name__ == "PackedConv2d")
    lin = next(m for m in model.modules() if type(m).__name__ == "PackedLinear")
    with torch.no_grad():
        conv.a_shift.normal_()
        lin.a_shift.normal_()
    x4 = torch.randn(2, conv.in_channels, 7, 9) * 3
    cases = [(conv, x4, (1, -1, 1, 1)), (conv, x4.contiguous(memory_format=torch.channels_last), (1, -1, 1, 1)),
             (lin, torch.randn(37, lin.in_features) * 3, (-1,))]
    for module, x, view in cases:
        expect = torch.clamp(torch.round((x + module.a_shift.view(view)) / module.a_step), module.a_qmin, module.a_qmax)
        got = cpu._input_codes(module, x, 1 if x.dim() == 4 else -1)
        assert got.dtype == torch.uint8 and torch.equal(got.float() + module.a_qmin, expect)


# --------------------------------------------------------------------------- switching, copies
def test_use_backend_switches_impl_hooks_and_copies() -> None:
    model = to_packed(qat_model("quantsr-c", "rbd", 4, 4))
    fp_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    use_backend(model, "cpu")
    assert backend_of(model) == "cpu" and all(m._forward_pre_hooks for m in fp_convs)
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(clone(x), model(x), atol=1e-5)
    use_backend(model, "torch")
    assert backend_of(model) == "torch" and not any(m._forward_pre_hooks for m in fp_convs)
    assert all(m.impl.__name__ == "reference_forward" for m in model.modules() if isinstance(m, PackedModule))

"""Packed -> trainable QAT models (``packing.unpack.to_qat``) and ``quantsr quantize --model PACKED``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.packing import PackedModule
from quantsr_cli.packing.convert import to_packed
from quantsr_cli.packing.io import load_model_file, read_metadata, save_model
from quantsr_cli.packing.unpack import to_qat
from quantsr_cli.quant import quantize_
from tests.conftest import run_cli


def _trained_qat(arch: str, method: str, bits: int, seed: int = 0) -> torch.nn.Module:
    """A small QAT model with initialised quantizers and non-trivial learned parameters."""
    torch.manual_seed(seed)
    hp = {"num_block": 2} if arch == "quantsr-c" else {"depths": [2], "num_heads": [2], "embed_dim": 12}
    model = build_model(arch, upscale=2, **hp)
    quantize_(model, QuantConfig(method=method, w_bits=bits, a_bits=bits, act_sign="mse"))
    model.train()
    model(torch.rand(2, 3, 16, 16))  # initialise every quantizer
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("shift"):
                p.normal_(0, 0.05)  # RLQ/RBD shifts learned away from 0
    return model.eval()


@pytest.mark.parametrize("arch", ["quantsr-c", "swinir-s"])
@pytest.mark.parametrize("method", ["rbd", "lsq", "rlq"])
@pytest.mark.parametrize("bits", [2, 4])
def test_to_qat_reproduces_the_packed_forward_and_codes(arch: str, method: str, bits: int) -> None:
    qat = _trained_qat(arch, method, bits)
    packed = to_packed(qat)
    rebuilt = to_qat(packed, QuantConfig(method=method, w_bits=bits, a_bits=bits)).eval()
    assert not any(isinstance(m, PackedModule) for m in rebuilt.modules())
    x = torch.rand(1, 3, 20, 24)
    with torch.no_grad():
        ref, got = packed(x), rebuilt(x)
    assert (ref - got).abs().max() <= 1e-5
    # packing the rebuilt model gives back exactly the same codes and side data
    again = to_packed(rebuilt)
    for (name, a), (_, b) in zip(packed.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_to_qat_model_trains_and_its_latent_weights_start_on_the_grid() -> None:
    qat = _trained_qat("quantsr-c", "rbd", 2)
    rebuilt = to_qat(to_packed(qat), QuantConfig(method="rbd", w_bits=2, a_bits=2))
    layer = rebuilt.get_submodule("body.0.conv1")
    level = layer.weight / layer.w_q.step
    assert torch.allclose(level, level.round(), atol=1e-5)  # weight = α·k
    assert torch.equal(layer.w_q.bit_scale.detach(), torch.ones(2))
    assert bool(layer.w_q.initialized) and bool(layer.act_q.initialized)
    out = rebuilt(torch.rand(2, 3, 16, 16))
    out.abs().mean().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.w_q.step.grad is not None and layer.act_q.step.grad is not None


@pytest.mark.parametrize("method", ["dorefa", "pams"])
def test_to_qat_refuses_methods_a_packed_file_does_not_determine(method: str) -> None:
    packed = to_packed(_trained_qat("quantsr-c", method, 2))
    with pytest.raises(ConfigError, match="cannot be fine-tuned"):
        to_qat(packed, QuantConfig(method=method, w_bits=2, a_bits=2))


def test_to_qat_rejects_codes_of_another_grid() -> None:
    packed = to_packed(_trained_qat("quantsr-c", "rbd", 2))
    with pytest.raises(CheckpointError, match="do not fit"):  # LSQ's zero (2) is not RBD's (1)
        to_qat(packed, QuantConfig(method="lsq", w_bits=2, a_bits=2))


def test_bundled_default_rebuilds_with_identical_output() -> None:
    packed = load_model_file(Path(__file__).resolve().parents[1] / "quantsr_cli/weights/default_x4_w2a2.safetensors")
    assert packed.quant_config == QuantConfig(method="rbd", w_bits=2, a_bits=2)  # from the file's header
    rebuilt = to_qat(packed).eval()  # the config defaults to the one the file carries
    x = torch.rand(1, 3, 24, 20)
    with torch.no_grad():
        assert (packed(x) - rebuilt(x)).abs().max() <= 1e-5


def test_quantize_model_fine_tunes_a_packed_file(tmp_path: Path, tiny_train_dir: Path) -> None:
    src = tmp_path / "start.safetensors"
    save_model(_trained_qat("quantsr-c", "rbd", 2), src, QuantConfig("rbd", 2, 2), {}, pack=True)
    run_dir = tmp_path / "run"
    res = run_cli("quantize", "--model", str(src), "--iters", "2", "--batch-size", "2", "--patch-size", "32",
                  "--val-every", "0", "--save-every", "2", "--train-data", str(tiny_train_dir),
                  "--run-dir", str(run_dir), "--threads", "1")
    assert res.returncode == 0, res.stderr
    meta = read_metadata(Path(res.stdout.strip()))
    assert meta["kind"] == "packed" and meta["arch"] == "quantsr-c" and meta["w_bits"] == "2"
    assert json.loads(meta["extra"])["start_model"] == "start.safetensors"
    bad = run_cli("quantize", "--model", str(src), "--arch", "imdn", "--run-dir", str(tmp_path / "r2"))
    assert bad.returncode == 1 and "cannot be combined" in bad.stderr
    dorefa = tmp_path / "dorefa.safetensors"
    save_model(_trained_qat("quantsr-c", "dorefa", 2), dorefa, QuantConfig("dorefa", 2, 2), {}, pack=True)
    refused = run_cli("quantize", "--model", str(dorefa), "--iters", "1", "--run-dir", str(tmp_path / "r3"))
    assert refused.returncode == 1 and str(dorefa) in refused.stderr and "cannot be fine-tuned" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "r3" / "checkpoints").exists()

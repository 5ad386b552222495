"""Adding a quantization method = this one file + one registry line (the ``monkeypatch.setitem`` below).

``toy`` is a max-abs method: symmetric signed weights ``round(W·q/max|W|)·max|W|/q`` and symmetric signed
activations whose step is fixed from the first batch's ``max|x|``, ``q = 2**(b−1) − 1``. Nothing else
in the package is changed; the method goes through ``quantsr quantize`` (calibration, training, the
packed output), ``quantsr pack``, the file loaders and ``quantsr eval``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from quantsr_cli.packing import PackedConv2d
from quantsr_cli.packing.io import load_model_file, read_metadata
from quantsr_cli.quant import METHODS, ActParams, ActQuantizer, MethodSpec, WeightParams, WeightQuantizer
from quantsr_cli.quant.base import to_codes
from quantsr_cli.quant.primitives import fake_quant


# ----------------------------------------------------------------------------------------- the method
class MaxAbsActQuantizer(ActQuantizer):
    """Signed grid ``step·[−q, q]`` with ``step = max|x| / q`` of the first batch (a buffer), plain STE."""

    method = "toy"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.qmax = 2 ** (bits - 1) - 1
        self.register_buffer("step", torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_((x.detach().abs().max().clamp_min(1e-8) / self.qmax).reshape(1))
                self.initialized.fill_(True)
        return fake_quant(x, self.step, -self.qmax, self.qmax)

    def export(self) -> ActParams:
        self._require_initialized()
        return ActParams(self.bits, self.step.detach().float().clone(), -self.qmax, self.qmax, None)


class MaxAbsWeightQuantizer(WeightQuantizer):
    """``scale·r``, ``r = clamp(round(W/scale), −q, q)``, ``scale = max|W| / q``; identity STE."""

    method = "toy"

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.qmax = 2 ** (bits - 1) - 1
        self.initialized.fill_(True)

    def _parts(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        scale = (weight.detach().abs().max().clamp_min(1e-8) / self.qmax).reshape(1)
        return torch.clamp(torch.round(weight.detach() / scale), -self.qmax, self.qmax), scale

    def forward(self, weight: Tensor) -> Tensor:
        r, scale = self._parts(weight)
        return scale * r + (weight - weight.detach())

    @torch.no_grad()
    def export(self, weight: Tensor) -> WeightParams:
        r, scale = self._parts(weight)
        return WeightParams(to_codes(r, float(self.qmax), self.bits), scale.float().clone(), float(self.qmax))


TOY = MethodSpec("toy", MaxAbsActQuantizer, MaxAbsWeightQuantizer, fine_tunable=False, summary="max-abs (test)")


# ----------------------------------------------------------------------------------------- the test
def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_a_method_defined_here_runs_quantize_pack_load_eval(tmp_path: Path, tiny_train_dir: Path,
                                                             shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS, TOY.name, TOY)  # the one registry line
    run = tmp_path / "run"
    out = _cli("quantize", "--arch", "quantsr-c", "--blocks", "1", "--method", "toy", "--bits", "4", "--iters", "3",
               "--batch-size", "2", "--patch-size", "32", "--val-every", "0", "--save-every", "3",
               "--train-data", str(tiny_train_dir), "--run-dir", str(run), "--threads", "1").strip().splitlines()[-1]
    meta = read_metadata(out)
    assert (meta["kind"], meta["method"], meta["w_bits"], meta["a_bits"]) == ("packed", "toy", "4", "4")

    qat = load_model_file(run / "qat_last.safetensors")  # the loader rebuilds the toy quantizers
    layer = qat.get_submodule("body.0.conv1")
    assert isinstance(layer.w_q, MaxAbsWeightQuantizer) and isinstance(layer.act_q, MaxAbsActQuantizer)
    assert bool(layer.act_q.initialized) and float(layer.act_q.step) > 0

    repacked = tmp_path / "repacked.safetensors"
    _cli("pack", str(run / "qat_last.safetensors"), "-o", str(repacked))
    packed = load_model_file(repacked)
    conv = packed.get_submodule("body.0.conv1")
    assert isinstance(conv, PackedConv2d) and conv.w_bits == 4 and conv.w_zero == 7.0  # the toy grid: zero = q
    assert (conv.a_qmin, conv.a_qmax) == (-7, 7)
    x = torch.rand(1, 3, 20, 16)
    with torch.no_grad():
        assert (packed(x) - qat(x)).abs().max() <= 1e-4  # packed forward == fake-quant forward

    result = json.loads(_cli("eval", "--model", str(repacked), "--dataset", "Set5", "--json",
                             "--data-root", str(shared_data / "benchmarks")))
    assert result["datasets"]["Set5"]["psnr"] > 5.0  # a real number from real images (3 iterations: not good)
    assert result["label"] == "quantsr-c x4 W4A4 toy (packed)"

"""Tests of quantsr_cli.quant.calibrate: empirical bias correction on toy models and, where the shared
data is present, on the published IMDN x4 weights at RBD W2A2 (the case that motivated it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.quant import QConv2d, QLinear, calibrate_, correct_biases_, initialize_quantizers, quantize_


class Toy(nn.Module):
    """conv → LeakyReLU → conv → pooled linear: two quantizable conv layers and one linear."""

    quant_patterns = ("c1", "c2", "fc")

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(nn.functional.leaky_relu(self.c1(x), 0.05))
        return self.fc(y.mean(dim=(2, 3)))


def _quantized_toy(method: str = "rbd", bits: int = 2) -> tuple[Toy, Toy, torch.Tensor]:
    torch.manual_seed(0)
    fp = Toy()
    with torch.no_grad():
        fp.c2.weight.add_(0.05)  # a skewed weight makes the quantization error biased
    q = Toy()
    q.load_state_dict(fp.state_dict())
    quantize_(q, QuantConfig(method, bits, bits), patterns=Toy.quant_patterns)
    x = torch.rand(8, 3, 12, 12)
    initialize_quantizers(q, x)
    return fp, q, x


def _layer_mean_errors(q: Toy, x: torch.Tensor, fp_bias: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-channel mean of (quantized layer output − FP layer output on the same input),
    the FP output using the layer's original bias ``fp_bias[name]``."""
    errs: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def f(layer, inputs, out):
            w, b, inp = layer.weight, fp_bias[name], inputs[0]
            ref = layer._conv_forward(inp, w, b) if isinstance(layer, QConv2d) else nn.functional.linear(inp, w, b)
            d = out - ref
            errs[name] = d.mean(dim=(0, 2, 3)) if d.dim() == 4 else d.mean(dim=0)
        return f

    handles = [getattr(q, n).register_forward_hook(hook(n)) for n in Toy.quant_patterns]
    q.eval()
    with torch.no_grad():
        q(x)
    for h in handles:
        h.remove()
    return errs


@pytest.mark.parametrize("method", ["rbd", "lsq", "pams"])
def test_bias_correction_zeroes_the_mean_error_of_every_layer(method: str) -> None:
    _, q, x = _quantized_toy(method)
    fp_bias = {n: getattr(q, n).bias.detach().clone() for n in Toy.quant_patterns}
    before = _layer_mean_errors(q, x, fp_bias)
    assert max(float(e.abs().max()) for e in before.values()) > 1e-3  # there was a bias to remove
    assert correct_biases_(q, x) == 3
    after = _layer_mean_errors(q, x, fp_bias)
    for name, e in after.items():
        assert float(e.abs().max()) < 1e-5, name


def test_bias_correction_touches_only_biases_and_restores_the_mode() -> None:
    _, q, x = _quantized_toy()
    q.train()
    state = {k: v.clone() for k, v in q.state_dict().items()}
    correct_biases_(q, x)
    assert q.training
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"c1.bias", "c2.bias", "fc.bias"}


def test_bias_correction_improves_the_network_output() -> None:
    fp, q, x = _quantized_toy()
    fp.eval()
    q.eval()
    with torch.no_grad():
        before = (q(x) - fp(x)).pow(2).mean()
        correct_biases_(q, x)
        after = (q(x) - fp(x)).pow(2).mean()
    assert after < before


def test_layers_without_bias_are_skipped() -> None:
    layer = nn.Sequential(nn.Linear(4, 4, bias=False))
    quantize_(layer, QuantConfig("lsq", 2, 2), patterns=("0",))
    x = torch.randn(5, 4)
    initialize_quantizers(layer, x)
    assert isinstance(layer[0], QLinear)
    assert correct_biases_(layer, x) == 0


def test_imdn_rbd_w2a2_calibration_with_bias_correction(shared_data) -> None:
    """Published IMDN x4 at RBD W2A2, calibrated on one T91 batch; Set5 (first 2 images) PSNR-Y.

    Without correction the asymmetric 2-bit grid wrecks the start (~13 dB on all of Set5). Correcting
    in the same pass that initialises the quantizers (``quantsr quantize``'s calibration) also sizes
    the activation steps on corrected activations: the last conv's step is far smaller than when the
    quantizers are first initialised on the uncorrected network."""
    from quantsr_cli.data import TrainDataset
    from quantsr_cli.engine.evaluate import evaluate_model
    from quantsr_cli.engine.modelio import load_model

    weights = shared_data / "weights" / "IMDN_x4.pth"
    if not weights.is_file():
        pytest.skip(f"{weights} not found")
    data = TrainDataset([str(shared_data / "train" / "T91")], scale=4, patch_size=96, seed=0)
    batch = data.sample_batch(0, 8)[0]
    psnr, last_step = {}, {}
    for mode in ("none", "after_init", "single_pass"):
        loaded = load_model(str(weights), arch="imdn", scale=4)
        quantize_(loaded.model, QuantConfig("rbd", 2, 2))
        if mode == "single_pass":
            calibrate_(loaded.model, batch)
        else:
            initialize_quantizers(loaded.model, batch)
            if mode == "after_init":
                correct_biases_(loaded.model, batch)
        loaded.model.eval()
        last_step[mode] = float(loaded.model.LR_conv.act_q.step.detach())
        psnr[mode] = evaluate_model(loaded, "Set5", bicubic=False, max_images=2).psnr
    assert psnr["none"] < 20.0
    assert psnr["after_init"] > 26.0 and psnr["single_pass"] > 26.0
    assert last_step["single_pass"] < 0.5 * last_step["none"]

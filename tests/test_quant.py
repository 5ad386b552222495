"""Tests of quantsr_cli.quant: hand-computed forward values and gradients of every quantizer,
bit-exact export, quantize_ on toy models (no quantsr_cli.models import), state-dict round trips."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.quant import (
    ActQuant,
    DoReFaActQuantizer,
    DoReFaWeightQuantizer,
    LSQActQuantizer,
    PAMSActQuantizer,
    PAMSWeightQuantizer,
    QConv2d,
    QLinear,
    RBDWeightQuantizer,
    RLQActQuantizer,
    apply_act_params,
    make_weight_quantizer,
    param_groups,
    quant_summary,
    quantize_,
    quantized_layers,
    quantizer_parameters,
)
from quantsr_cli.quant.primitives import grad_scale, round_phi, round_ste, sign_ste

METHODS = ("rbd", "rlq", "lsq", "dorefa", "pams")
BITS = (2, 4, 8)


def dphi(f: float) -> float:
    """Hand formula φ'(f) = sech²(f − 0.5) / (2·tanh(0.5))."""
    return (1.0 / math.cosh(f - 0.5) ** 2) / (2.0 * math.tanh(0.5))


class Toy(nn.Module):
    """Conv head, residual conv block (signed + ReLU-fed inputs), an activation point, a linear."""

    quant_patterns = ("body.*", "point", "fc")

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.point = nn.Identity()
        self.fc = nn.Linear(8, 8)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        x = x + self.body(x)
        z = x.permute(0, 2, 3, 1)
        y = self.fc(torch.tanh(self.point(z)) + z).permute(0, 3, 1, 2)
        return self.tail(y)


def _manual(q: nn.Module, step: float, signed: bool = False) -> None:
    with torch.no_grad():
        q.step.fill_(step)
    q.signed.fill_(signed)
    q.initialized.fill_(True)


# ---------------------------------------------------------------- primitives


def test_round_phi_values_and_gradient() -> None:
    x = torch.tensor([2.0, 2.5, -0.25, 3.7], requires_grad=True)
    y = round_phi(x)
    assert torch.equal(y, torch.tensor([2.0, 2.0, -0.0, 4.0]))  # torch.round: half to even
    y.sum().backward()
    assert x.grad[0].item() == pytest.approx(0.8509, abs=1e-4)  # f = 0
    assert x.grad[1].item() == pytest.approx(1.0820, abs=1e-4)  # f = 0.5
    assert x.grad[2].item() == pytest.approx(dphi(0.75), abs=1e-5)
    assert x.grad[3].item() == pytest.approx(dphi(0.7), abs=1e-5)


def test_round_ste_grad_scale_and_sign() -> None:
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))
    a = torch.tensor([0.123456789], requires_grad=True)
    s = grad_scale(a, 0.25)
    assert torch.equal(s, a)  # value is bit-exact
    (3 * s).sum().backward()
    assert a.grad.item() == pytest.approx(0.75)
    z = torch.tensor([-1.5, -1.0, 0.0, 0.5, 2.0], requires_grad=True)
    b = sign_ste(z)
    assert torch.equal(b, torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))  # sign(0) = +1
    b.sum().backward()
    assert torch.equal(z.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


# ---------------------------------------------------------------- learned-step activations


def test_lsq_act_init_and_step_gradient() -> None:
    q = LSQActQuantizer(2)
    x = torch.tensor([0.2, 0.7, 1.2, 2.0])
    q(x)
    assert not bool(q.signed) and bool(q.initialized)
    assert q.step.item() == pytest.approx(2 * 1.025 / math.sqrt(3), rel=1e-6)  # 2·mean|x|/√Qp
    with torch.no_grad():
        q.step.fill_(0.5)
    x.requires_grad_(True)
    y = q(x)  # v = [0.4, 1.4, 2.4, 4.0] -> q = [0, 1, 2, 3(clipped)]
    assert torch.allclose(y, torch.tensor([0.0, 0.5, 1.0, 1.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # Σ_inside (round(v) − v) + Σ_outside Qp = −1.2 + 3, times g = 1/√(N·Qp) = 1/√12
    assert q.step.grad.item() == pytest.approx(1.8 / math.sqrt(12), rel=1e-5)


def test_act_signedness_from_first_batch() -> None:
    q = LSQActQuantizer(2)
    x = torch.tensor([-0.5, 0.5, 1.0, 2.0])
    q(x)
    assert bool(q.signed) and q.qrange == (-2, 1)
    assert q.step.item() == pytest.approx(2 * 1.0 / math.sqrt(1), rel=1e-6)
    q(torch.tensor([0.1, 0.2]))  # later batches never re-decide
    assert bool(q.signed)
    assert q.export().qmin == -2 and q.export().qmax == 1


def test_rlq_act_phi_gradient_and_shift_added() -> None:
    q = RLQActQuantizer(2, shift_shape=(1, 2, 1, 1))
    _manual(q, 0.5)
    with torch.no_grad():
        q.shift.copy_(torch.tensor([0.1, -0.1]).reshape(1, 2, 1, 1))
    x = torch.tensor([0.2, 0.7, 1.2, 2.0]).reshape(1, 2, 1, 2).requires_grad_(True)
    y = q(x)  # x + τ̂ = [0.3, 0.8 | 1.1, 1.9] -> v = [0.6, 1.6, 2.2, 3.8] -> [1, 2, 2, 3]
    assert torch.allclose(y.flatten(), torch.tensor([0.5, 1.0, 1.0, 1.5]))
    y.sum().backward()
    g06, g02 = dphi(0.6), dphi(0.2)
    assert torch.allclose(x.grad.flatten(), torch.tensor([g06, g06, g02, 0.0]), atol=1e-5)
    assert torch.allclose(q.shift.grad.flatten(), torch.tensor([2 * g06, g02]), atol=1e-5)
    dstep = (1 - 0.6 * g06) + (2 - 1.6 * g06) + (2 - 2.2 * g02) + 3
    assert q.step.grad.item() == pytest.approx(dstep / math.sqrt(4 * 3), abs=1e-5)


def test_eval_before_init_initialises_once() -> None:
    q = LSQActQuantizer(4).eval()
    with pytest.raises(CheckpointError):
        q.export()
    x = torch.randn(2, 3, 5, 5)
    q(x)
    assert bool(q.initialized) and q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    step = q.step.item()
    q.train()(torch.randn(2, 3, 5, 5) * 10)
    assert q.step.item() == step  # a later training batch does not re-initialise


# ---------------------------------------------------------------- RBD weights


def test_rbd_uniform_grid_and_saturation() -> None:
    q = RBDWeightQuantizer(4)
    q.step.data.fill_(1.0)
    q.initialized.fill_(True)
    w = torch.tensor([12.0, -9.0, 2.6, -0.6, 0.0, 8.0, -7.0])
    assert torch.equal(q(w).detach(), torch.tensor([8.0, -7.0, 3.0, -1.0, 0.0, 8.0, -7.0]))
    for bits in BITS:
        q = RBDWeightQuantizer(bits)
        q.step.data.fill_(0.25)
        q.initialized.fill_(True)
        w = torch.randn(20000) * 2 ** (bits - 3) * 1.5
        k = torch.clamp(torch.floor(w / 0.25 + 0.5), -(2 ** (bits - 1)) + 1, 2 ** (bits - 1))
        assert torch.equal(q(w).detach(), 0.25 * k)
        codes, scale, zero = q.export(w)
        assert zero == 2 ** (bits - 1) - 1 and int(codes.min()) >= 0 and int(codes.max()) <= 2**bits - 1


def test_rbd_clipped_ste_gradients() -> None:
    q = RBDWeightQuantizer(2)
    q.step.data.fill_(1.0)
    q.initialized.fill_(True)
    w = torch.tensor([1.2, 0.3], requires_grad=True)
    y = q(w)
    assert torch.equal(y.detach(), torch.tensor([1.0, 0.0]))
    y.sum().backward()
    # hand derivation (see docstring of RBDWeightQuantizer): W=1.2 -> b1=+1 (pre 1.4, clipped), b0=-1
    # (pre -0.6); W=0.3 -> b1=-1 (pre -0.4), b0=+1 (pre 1.6, clipped)
    assert torch.allclose(w.grad, torch.tensor([1.0, 2.0]))
    assert torch.allclose(q.bit_bias.grad, torch.tensor([-0.5, -1.0]))
    assert torch.allclose(q.bit_scale.grad, torch.tensor([-0.3, -1.4]), atol=1e-6)
    assert q.step.grad.item() == pytest.approx(-0.8 / math.sqrt(2 * 1), rel=1e-5)


# ---------------------------------------------------------------- DoReFa and PAMS


def test_dorefa_weight_values_and_identity_ste() -> None:
    q = DoReFaWeightQuantizer(2)
    w = torch.tensor([0.5, -1.0, 0.1, 2.0], requires_grad=True)
    y = q(w)
    m = math.tanh(2.0)
    assert torch.allclose(y, torch.tensor([m / 3, -m, m / 3, m]), atol=1e-6)
    y.sum().backward()
    assert torch.allclose(w.grad, 1 - torch.tanh(w.detach()) ** 2, atol=1e-6)
    codes, scale, zero = q.export(w)
    assert zero == 1.5 and codes.tolist() == [2, 0, 2, 3]


def test_dorefa_act_values_and_gradient() -> None:
    q = DoReFaActQuantizer(2)
    x = torch.tensor([-0.5, 0.2, 0.4, 0.9, 1.5], requires_grad=True)
    y = q(x)
    assert torch.allclose(y, torch.tensor([0.0, 1 / 3, 1 / 3, 1.0, 1.0]), atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_pams_weight_values_and_identity_ste() -> None:
    q = PAMSWeightQuantizer(4)
    w = torch.tensor([0.6, -1.0, 0.1, 0.3], requires_grad=True)
    y = q(w)  # W·7/max = [4.2, -7, 0.7, 2.1] -> [4, -7, 1, 2] / 7
    assert torch.allclose(y, torch.tensor([4.0, -7.0, 1.0, 2.0]) / 7, atol=1e-6)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(4))
    assert q.export(w).codes.tolist() == [11, 0, 8, 9]


def test_pams_act_ema_warmup_then_clip() -> None:
    q = PAMSActQuantizer(4, ema_steps=2, ema_decay=0.9)
    x1 = torch.tensor([[0.5, -2.0, 1.0], [4.0, 0.1, -0.3]])
    y1 = q(x1)  # α = mean of per-sample max = 3; unclipped: 4.0 -> round(9.33)·3/7
    assert q.alpha.item() == pytest.approx(3.0)
    assert y1[1, 0].item() == pytest.approx(9 * 3 / 7, rel=1e-6)
    q(torch.tensor([[1.0, 0.5], [-1.0, 0.2]]))
    assert q.alpha.item() == pytest.approx(0.9 * 3 + 0.1 * 1.0, rel=1e-6)
    x3 = torch.tensor([[5.0, 1.3]], requires_grad=True)
    y3 = q(x3)  # clipped now; step = 2.8/7 = 0.4: 1.3 -> round(3.25)=3 -> 1.2
    assert torch.allclose(y3, torch.tensor([[2.8, 1.2]]), atol=1e-5)
    y3.sum().backward()
    assert torch.equal(x3.grad, torch.tensor([[0.0, 1.0]]))
    assert q.alpha.grad.item() == pytest.approx(1 + (3 - 3.25) / 7, abs=1e-4)


# ---------------------------------------------------------------- export contract


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", BITS)
def test_export_bit_exact(method: str, bits: int) -> None:
    cfg = QuantConfig(method, bits, bits)
    torch.manual_seed(1)
    conv = QConv2d.from_float(nn.Conv2d(4, 5, 3, padding=1), cfg)
    lin = QLinear.from_float(nn.Linear(6, 3), cfg)
    point = ActQuant(cfg)
    xc, xl, xp = torch.randn(2, 4, 6, 6), torch.randn(2, 7, 6), torch.randn(2, 3, 5, 4)
    for layer, x in ((conv, xc), (lin, xl), (point, xp)):
        layer(x)  # initialise (training mode)
        aq = layer.act_q
        if getattr(aq, "shift", None) is not None:
            with torch.no_grad():
                aq.shift.normal_(0, 0.3)
        layer.eval()
        p = aq.export()
        assert p.bits == bits and p.step.dtype == torch.float32 and p.step.shape == (1,)
        dim = 1 if layer is conv else -1
        assert torch.equal(aq(x), apply_act_params(x, p, channel_dim=dim))
        if p.shift is not None:
            assert p.shift.dtype == torch.float32 and p.shift.shape == (x.shape[dim],)
            xs = x + (p.shift.reshape(1, -1, 1, 1) if layer is conv else p.shift)
        else:
            xs = x
        assert torch.equal(aq(x), p.step * torch.clamp(torch.round(xs / p.step), p.qmin, p.qmax))
        if layer is point:
            continue
        codes, scale, zero = layer.w_q.export(layer.weight)
        assert codes.dtype == torch.uint8 and codes.shape == layer.weight.shape
        assert int(codes.max()) <= 2**bits - 1 and scale.dtype == torch.float32 and scale.shape == (1,)
        assert float(zero) * 2 == int(float(zero) * 2)  # integer or half-integer
        assert torch.equal(layer.w_q(layer.weight), scale * (codes.float() - zero))


# ---------------------------------------------------------------- modules and quantize_


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", BITS)
def test_toy_forward_backward_reaches_quantizers(method: str, bits: int) -> None:
    model = quantize_(Toy(), QuantConfig(method, bits, bits))
    assert isinstance(model.body[0], QConv2d) and isinstance(model.fc, QLinear)
    assert isinstance(model.point, ActQuant) and type(model.head) is nn.Conv2d
    for m in model.modules():
        if isinstance(m, PAMSActQuantizer):
            m.ema_steps = 1
    model(torch.randn(2, 3, 6, 6))  # warm-up / init batch
    model.zero_grad()
    out = model(torch.randn(2, 3, 6, 6))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for layer in (model.body[0], model.body[2], model.fc):
        assert layer.weight.grad.abs().sum() > 0
        for pname, p in list(layer.act_q.named_parameters()) + list(layer.w_q.named_parameters()):
            assert p.grad.abs().sum() > 0, f"{method} {bits} {pname}"
    if method in ("rbd", "rlq", "lsq"):  # conv1 sees the residual stream, conv2 a ReLU output
        assert bool(model.body[0].act_q.signed) and not bool(model.body[2].act_q.signed)
    if method in ("rbd", "rlq"):
        assert model.body[0].act_q.shift.shape == (1, 8, 1, 1) and model.fc.act_q.shift.shape == (8,)
        assert model.point.act_q.shift is None


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method: str) -> None:
    cfg = QuantConfig(method, 4, 2)
    model = quantize_(Toy(0), cfg)
    opt = torch.optim.Adam(param_groups(model, lr=1e-2))
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        model(x).abs().mean().backward()
        opt.step()
    sd = model.state_dict()
    assert "body.0.act_q.initialized" in sd and "body.0.weight" in sd
    fresh = quantize_(Toy(5), cfg)
    fresh.load_state_dict(sd)
    model.eval()
    fresh.eval()
    xt = torch.randn(1, 3, 7, 5)
    assert torch.equal(model(xt), fresh(xt))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_quantize_api_errors_and_options() -> None:
    toy = Toy()
    assert quantize_(toy, QuantConfig("rbd", 32, 32)) is toy and not quantized_layers(toy)
    with pytest.raises(ConfigError, match="nope"):
        quantize_(toy, QuantConfig(), patterns=("body.*", "nope.*"))
    assert not quantized_layers(toy)  # nothing changed on error
    with pytest.raises(ConfigError):
        quantize_(nn.Sequential(nn.Conv2d(1, 1, 1)), QuantConfig())  # no quant_patterns
    w0 = toy.body[0].weight
    quantize_(toy, QuantConfig("lsq", 4, 32), patterns=("body.0", "point"))
    assert list(quantized_layers(toy)) == ["body.0"]  # a_bits=32: Identity kept
    assert toy.body[0].weight is w0 and toy.body[0].act_q is None and isinstance(toy.point, nn.Identity)
    with pytest.raises(ConfigError, match="already"):
        quantize_(toy, QuantConfig())
    lin = QLinear.from_float(nn.Linear(3, 2), QuantConfig("pams", 32, 4))
    x = torch.randn(4, 3)
    assert lin.w_q is None and torch.equal(lin(x), nn.functional.linear(lin.act_q(x), lin.weight, lin.bias))


def test_summary_and_param_groups() -> None:
    model = quantize_(Toy(), QuantConfig("rbd", 2, 4))
    summary = quant_summary(model)
    json.dumps(summary)
    assert summary["num_layers"] == 4 and summary["methods"] == ["rbd"]
    assert summary["layers"]["body.0"] == {"kind": "conv", "method": "rbd", "w_bits": 2, "a_bits": 4}
    assert summary["layers"]["point"]["kind"] == "act" and summary["layers"]["fc"]["kind"] == "linear"
    groups = param_groups(model, lr=2e-4, quant_lr=1e-3)
    assert [g["name"] for g in groups] == ["weights", "quantizers"] and groups[1]["lr"] == 1e-3
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in quantizer_parameters(model)}
    assert id(model.body[0].w_q.bit_scale) in {id(p) for p in groups[1]["params"]}


@pytest.mark.parametrize(
    ("method", "floors"),
    [("rbd", (6.0, 15.0, 27.0)), ("rlq", (6.0, 15.0, 27.0)), ("lsq", (6.0, 15.0, 27.0)),
     ("dorefa", (1.0, 15.0, 39.0)), ("pams", (0.2, 14.5, 39.0))],
)
def test_weight_sqnr_floors(method: str, floors: tuple[float, float, float]) -> None:
    """SQNR of freshly initialised fake-quant weights on a Gaussian conv weight. Low 2-bit values of
    DoReFa/PAMS (max scaling) and LSQ's wide 8-bit init are the methods' known behaviour."""
    torch.manual_seed(0)
    w = torch.randn(64, 64, 3, 3) * 0.05
    for bits, floor in zip(BITS, floors):
        with torch.no_grad():
            wq = make_weight_quantizer(method, bits)(w)
        sqnr = 10 * math.log10(w.pow(2).sum() / (w - wq).pow(2).sum())
        assert sqnr > floor, (method, bits, sqnr)


def test_act_sign_rule_mse_picks_unsigned_for_a_leaky_relu_output() -> None:
    torch.manual_seed(0)
    leaky = nn.functional.leaky_relu(torch.randn(4, 8, 16, 16), 0.05)
    released = RLQActQuantizer(2, (1, 8, 1, 1))
    released(leaky)
    assert bool(released.signed)  # any negative value → signed, as in ActOurs
    mse = RLQActQuantizer(2, (1, 8, 1, 1), sign_rule="mse")
    mse(leaky)
    assert not bool(mse.signed)
    assert mse.qrange == (0, 3)
    # the chosen grid really has the lower error at the LSQ initial step
    err = {s: float((q(leaky) - leaky).square().mean()) for s, q in (("min", released), ("mse", mse))}
    assert err["mse"] < err["min"]


def test_act_sign_rule_mse_keeps_signed_for_symmetric_data_and_is_validated() -> None:
    torch.manual_seed(1)
    q = LSQActQuantizer(4, None, sign_rule="mse")
    q(torch.randn(2, 4, 8, 8))
    assert bool(q.signed)
    with pytest.raises(ConfigError, match="act_sign"):
        QuantConfig("rbd", 2, 2, act_sign="max")
    layer = quantize_(nn.Sequential(nn.Conv2d(3, 4, 3)), QuantConfig("rbd", 2, 2, act_sign="mse"), patterns=("0",))
    assert layer[0].act_q.sign_rule == "mse"

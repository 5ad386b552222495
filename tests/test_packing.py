"""Bit layouts, packed modules, quantsr safetensors files and their error handling."""

from __future__ import annotations

import json
import math
import struct
from collections import namedtuple
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from quantsr_cli import fileio
from quantsr_cli.errors import CheckpointError, FormatVersionError, QuantSRError
from quantsr_cli.packing import io
from quantsr_cli.packing.convert import build_packed_model, decode_layers, encode_layers, to_packed
from quantsr_cli.packing.layout import (
    PackFormat,
    conv_weight_to_rows,
    pack_codes,
    rows_to_conv_weight,
    unpack_codes,
)
from quantsr_cli.packing.modules import PackedActQuant, PackedConv2d, PackedLinear

FakeActParams = namedtuple("FakeActParams", "bits step qmin qmax shift")


# --------------------------------------------------------------------------- fake QAT layers (contract)
class FakeWQ(nn.Module):
    """Per-channel weight quantizer with a fixed zero (integer or half-integer)."""

    def __init__(self, bits: int, zero: float, out: int) -> None:
        super().__init__()
        self.bits, self.zero = bits, zero
        self.register_buffer("scale", torch.rand(out) * 0.02 + 0.01)

    def _codes(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale.view(-1, *[1] * (w.dim() - 1))
        return torch.clamp(torch.round(w / s + self.zero), 0, 2**self.bits - 1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale.view(-1, *[1] * (w.dim() - 1)) * (self._codes(w) - self.zero)

    def export(self, w: torch.Tensor):
        return self._codes(w).to(torch.uint8), self.scale.clone(), self.zero


class FakeAQ(nn.Module):
    def __init__(self, bits: int, signed: bool, channels: int | None, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        self.step = torch.tensor([0.37 / 2 ** (bits - 2)])
        self.shift = None if channels is None else torch.randn(channels) * 0.1
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x + self.shift.view(self.shape)
        return self.step * torch.clamp(torch.round(x / self.step), self.qmin, self.qmax)

    def export(self) -> FakeActParams:
        return FakeActParams(self.bits, self.step, self.qmin, self.qmax, self.shift)


class FakeQConv2d(nn.Conv2d):
    def __init__(self, cin: int, cout: int, w_bits: int, a_bits: int, zero: float | None = None, **kw) -> None:
        super().__init__(cin, cout, 3, padding=1, **kw)
        self.w_q = FakeWQ(w_bits, 2 ** (w_bits - 1) if zero is None else zero, cout)
        self.act_q = FakeAQ(a_bits, True, cin, (1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_q(x), self.w_q(self.weight), self.bias)


class FakeQLinear(nn.Linear):
    def __init__(self, cin: int, cout: int, w_bits: int, a_bits: int) -> None:
        super().__init__(cin, cout)
        self.w_q = FakeWQ(w_bits, 2 ** (w_bits - 1), cout)
        self.act_q = FakeAQ(a_bits, False, cin, (-1,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_q(x), self.w_q(self.weight), self.bias)


class Toy(nn.Module):
    """FP conv 3->64, ``n`` fake-quantized 64-channel convs, an activation point, FP conv 64->3."""

    def __init__(self, w_bits: int = 4, a_bits: int = 4, n: int = 4, zero: float | None = None) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 64, 3, padding=1)
        self.body = nn.Sequential(*(FakeQConv2d(64, 64, w_bits, a_bits, zero) for _ in range(n)))
        self.point = FakeAQ(a_bits, True, None)
        self.tail = nn.Conv2d(64, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.point(self.body(self.head(x))))


def _fp_toy(n: int = 4) -> nn.Module:
    toy = Toy(n=n)
    for i in range(n):
        toy.body[i] = nn.Conv2d(64, 64, 3, padding=1)
    toy.point = nn.Identity()
    return toy


# --------------------------------------------------------------------------- layout
@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 9), k=st.integers(1, 131), seed=st.integers(0, 2**31))
def test_pack_unpack_identity(bits: int, rows: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, k), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(k * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, k), codes)
    per = 8 // bits
    j = int(torch.randint(0, k, (1,), generator=gen))
    assert (int(packed[0, j // per]) >> ((j % per) * bits)) & (2**bits - 1) == int(codes[0, j])
    if k % per:  # padding bits of the last byte are zero
        assert int(packed[0, -1]) >> ((k % per) * bits) == 0


def test_layout_examples_and_formats() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [[0b00111001, 0b01]]
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x03, 0x01]]
    assert PackFormat.for_bits(4) is PackFormat.U4_ROW_LSB and PackFormat("u2_row_lsb").bits == 2
    for fmt in PackFormat:
        assert "byte" in fmt.__doc__ and "scale * (u - zero)" in fmt.__doc__
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        PackFormat.for_bits(3)


def test_conv_reorder_ohwi() -> None:
    w = torch.arange(5 * 3 * 2 * 4).reshape(5, 3, 2, 4)
    rows = conv_weight_to_rows(w)
    o, i, h, x = 4, 2, 1, 3
    assert rows.shape == (5, 2 * 4 * 3) and rows[o, (h * 4 + x) * 3 + i] == w[o, i, h, x]
    assert torch.equal(rows_to_conv_weight(rows, w.shape), w)


# --------------------------------------------------------------------------- packed modules
@pytest.mark.parametrize("w_bits,a_bits,zero", [(2, 2, None), (4, 4, None), (8, 8, None), (2, 4, 1.5), (4, 2, 7.5)])
def test_packed_conv_equals_fake_quant(w_bits: int, a_bits: int, zero: float | None) -> None:
    torch.manual_seed(0)
    layer = FakeQConv2d(16, 8, w_bits, a_bits, zero, stride=2).eval()
    packed = PackedConv2d.from_qat(layer)
    assert packed.qweight.shape == (8, math.ceil(16 * 9 * w_bits / 8)) and packed.w_zero == layer.w_q.zero
    x = torch.rand(2, 16, 11, 13) * 2 - 0.5
    assert torch.equal(packed(x), layer(x))


def test_packed_linear_and_act_point() -> None:
    torch.manual_seed(0)
    lin = FakeQLinear(24, 10, 4, 8)
    x = torch.rand(3, 5, 24)
    assert torch.equal(PackedLinear.from_qat(lin)(x), lin(x))
    point = FakeAQ(4, True, None)
    packed = PackedActQuant.from_qat(point)
    assert packed.spec()["type"] == "act" and torch.equal(packed(x), point(x))


# --------------------------------------------------------------------------- files
def _saved(tmp_path: Path, model: nn.Module, name: str = "m.safetensors") -> Path:
    tensors, meta = io.pack_model(model, extra={"cmd": "test"})
    path = tmp_path / name
    io.save_file(tensors, meta, path)
    return path


def test_save_read_roundtrip_and_atomicity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    toy = Toy(2, 2, n=2)
    path = _saved(tmp_path, toy)
    tensors, meta = io.read_file(path)
    ref_tensors, ref_meta = io.pack_model(toy, extra={"cmd": "test"})
    assert set(tensors) == set(ref_tensors) and all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    assert meta["format"] == "quantsr" and meta["format_version"] == "1" and meta["kind"] == "packed"
    assert json.loads(meta["extra"]) == {"cmd": "test"} and io.read_metadata(path) == meta
    assert decode_layers(meta)[0]["format"] == "u2_row_lsb" and decode_layers(meta)[0]["shape"] == [64, 64, 3, 3]
    before = path.read_bytes()

    monkeypatch.setattr(fileio.os, "replace", mock.Mock(side_effect=OSError(28, "No space left on device")))
    with pytest.raises(CheckpointError, match="No space"):
        io.save_file(tensors, meta, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_packed_model_rebuilt_from_file_gives_identical_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    toy = Toy(4, 4, n=2).eval()
    tensors, meta = io.read_file(_saved(tmp_path, toy))
    rebuilt = build_packed_model(_fp_toy(2), tensors, meta)
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), toy(x)) and torch.equal(rebuilt(x), to_packed(toy)(x))


@pytest.mark.parametrize("w_bits,a_bits", [(2, 2), (4, 4)])
def test_file_size_accounting_toy(w_bits: int, a_bits: int) -> None:
    tensors, meta = io.pack_model(Toy(w_bits, a_bits, n=2))
    report = io.size_report((tensors, meta))
    q = 2 * 64 * 64 * 9
    assert report["quantized_params"] == q
    fp_bytes = 4 * (3 * 64 * 9 + 64 + 64 * 3 * 9 + 3 + 2 * 64)  # FP convs + quantized layers' biases
    scales = 4 * (2 * (64 + 1 + 64) + 1)  # per-channel w_scale, a_step, a_shift; the point's step
    assert report["expected_bytes"] == q * w_bits // 8 + fp_bytes + scales
    assert report["file_bytes"] <= 1.05 * report["expected_bytes"], report
    assert report["params"] == q + 3 * 64 * 9 + 64 + 64 * 3 * 9 + 3 + 2 * 64


def _real_qat(method: str, bits: int, **hparams: object) -> nn.Module:
    models = pytest.importorskip("quantsr_cli.models")
    quant = pytest.importorskip("quantsr_cli.quant")
    from quantsr_cli.config import QuantConfig

    torch.manual_seed(0)
    model = quant.quantize_(models.build_model("quantsr-c", **hparams), QuantConfig(method, bits, bits))
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 12, 12))  # lazy quantizer initialisation
    return model.eval()


@pytest.mark.parametrize("bits", [2, 4])
def test_file_size_accounting_real_model(tmp_path: Path, bits: int) -> None:
    model = _real_qat("rbd", bits, upscale=4, num_block=4)
    path = tmp_path / "m.safetensors"
    io.save_model(model, path, pack=True)
    report = io.size_report(path)
    quantized = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith(("conv1", "conv2")))
    fp = sum(p.numel() for n, p in model.state_dict().items() if not n.endswith((".conv1.weight", ".conv2.weight"))
             and ".act_q." not in n and ".w_q." not in n)
    scales = 8 * (1 + 1 + 64)  # per layer: w_scale, a_step, a_shift (64 channels)
    expected = quantized * bits // 8 + fp * 4 + scales * 4
    assert report["quantized_params"] == quantized == 8 * 64 * 64 * 9
    assert report["expected_bytes"] == expected and report["file_bytes"] == path.stat().st_size
    assert report["file_bytes"] <= 1.05 * expected, report


def test_size_report_of_unpacked_file_ignores_free_form_layers(tmp_path: Path) -> None:
    path = tmp_path / "qat.safetensors"
    io.save_file({"w": torch.zeros(4, 3), "b": torch.zeros(4)}, {"kind": "qat", "layers": '{"num_layers": 1}'}, path)
    report = io.size_report(path)
    assert report["params"] == 16 and report["quantized_params"] == 0 and report["expected_bytes"] == 64


@pytest.mark.parametrize("kind", ["packed", "qat", "fp"])
def test_load_model_file_roundtrip(tmp_path: Path, kind: str) -> None:
    model = _real_qat("dorefa" if kind == "qat" else "rbd", 2, upscale=2, num_block=2, num_feat=16)
    model.body[1].skip = True
    if kind == "fp":
        model = pytest.importorskip("quantsr_cli.models").build_model("quantsr-c", upscale=2, num_block=2, num_feat=16)
        model.body[1].skip = True
    path = tmp_path / f"{kind}.safetensors"
    meta = io.save_model(model, path, pack=kind == "packed", extra={"note": kind})
    loaded = io.load_model_file(path)
    assert meta["kind"] == kind == io.read_metadata(path)["kind"] and loaded.body[1].skip
    x = torch.rand(1, 3, 10, 14)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# --------------------------------------------------------------------------- errors
def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


@pytest.fixture()
def valid_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return _saved(tmp_path, Toy(2, 2, n=1))


def test_broken_files_raise_checkpoint_error(valid_file: Path, tmp_path: Path) -> None:
    raw = valid_file.read_bytes()
    cases = {"empty": b"", "short": raw[:5], "header_cut": raw[:40], "data_cut": raw[:-7], "garbage": b"\x00" * 64}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError, match=name):
            io.read_file(bad)
    flipped = bytearray(raw)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        io.read_file(tmp_path / "flip.safetensors")
    for missing in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(CheckpointError):
            io.read_metadata(missing)


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda h: h["__metadata__"].update(format_version="2"), FormatVersionError, "newer"),
        (lambda h: h["__metadata__"].update(format_version="1.0"), FormatVersionError, "format_version"),
        (lambda h: h["__metadata__"].update(format="pt"), CheckpointError, "not a quantsr"),
        (lambda h: h.pop("__metadata__"), CheckpointError, "not a quantsr"),
    ],
)
def test_header_checks(valid_file: Path, edit, error: type, match: str) -> None:
    _rewrite_header(valid_file, edit)
    for reader in (io.read_metadata, io.read_file):
        with pytest.raises(error, match=match):
            reader(valid_file)


def _set_bits(meta: dict, bits: int) -> None:
    layers = decode_layers(meta)
    layers[0]["w_bits"] = bits
    meta["layers"] = encode_layers(layers)


_TAMPER = {  # (tensors, meta, key of a qweight) -> None; qparams = [w_scale (64), a_step, a_shift (64), bias (64)]
    "missing": lambda t, m, k: t.pop(k),
    "extra": lambda t, m, k: t.update({"body.9.qweight": torch.zeros(1, dtype=torch.uint8)}),
    "shape": lambda t, m, k: t.update({k: t[k][:, :-1].clone()}),
    "dtype": lambda t, m, k: t.update({k: t[k].float()}),
    "layers_json": lambda t, m, k: m.update(layers=m["layers"][:-2]),
    "layer_bits": lambda t, m, k: _set_bits(m, 3),
    "bad_step": lambda t, m, k: t[k.replace("qweight", "qparams")].__setitem__(64, -1.0),
    "qparams_len": lambda t, m, k: t.update({k.replace("qweight", "qparams"): torch.zeros(5)}),
}


@pytest.mark.parametrize("how", sorted(_TAMPER))
def test_mismatched_content_raises_checkpoint_error(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    tensors, meta = io.pack_model(Toy(4, 4, n=2))
    _TAMPER[how](tensors, meta, next(k for k in tensors if k.endswith("qweight")))
    path = tmp_path / "t.safetensors"
    io.save_file(tensors, meta, path)
    tensors, meta = io.read_file(path)
    with pytest.raises(CheckpointError, match=str(path)):
        build_packed_model(_fp_toy(2), tensors, meta, path)


def test_load_model_file_rejects_non_models(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    io.save_file({"x": torch.zeros(2)}, {"kind": "train_state"}, path)
    with pytest.raises(CheckpointError, match="not a model"):
        io.load_model_file(path)
    io.save_file({"x": torch.zeros(2)}, {"kind": "fp", "arch": "no-such-arch", "hparams": "{}"}, path)
    with pytest.raises(CheckpointError, match="no-such-arch"):
        io.load_model_file(path)


def _only_quantsr_errors(path: Path) -> None:
    for reader in (io.read_file, io.read_metadata, io.load_model_file, io.size_report):
        try:
            reader(path)
        except QuantSRError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300), prefix=st.booleans())
def test_fuzz_random_bytes(tmp_path: Path, blob: bytes, prefix: bool) -> None:
    path = tmp_path / "fuzz.safetensors"
    if prefix:  # a plausible header length so the JSON parser sees the bytes
        blob = struct.pack("<Q", len(blob)) + blob
    path.write_bytes(blob)
    _only_quantsr_errors(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def real_packed_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("real") / "m.safetensors"
    io.save_model(_real_qat("rbd", 2, upscale=2, num_block=1, num_feat=8), path, pack=True)
    return path.read_bytes()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutated_valid_file(tmp_path: Path, real_packed_bytes: bytes, data: st.DataObject) -> None:
    raw = bytearray(real_packed_bytes)
    (n,) = struct.unpack("<Q", raw[:8])
    mode = data.draw(st.sampled_from(["bytes", "truncate", "meta"]))
    if mode == "bytes":
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:  # structurally valid file, hostile metadata values
        header = json.loads(raw[8 : 8 + n])
        meta = header["__metadata__"]
        key = data.draw(st.sampled_from(sorted(meta)))
        meta[key] = json.dumps(data.draw(_JSON)) if data.draw(st.booleans()) else data.draw(st.text(max_size=20))
        if key == "layers" and data.draw(st.booleans()):
            table = json.loads(json.loads(real_packed_bytes[8 : 8 + n])["__metadata__"]["layers"])
            row = data.draw(st.integers(0, len(table["rows"]) - 1))
            table["rows"][row][data.draw(st.integers(0, len(table["fields"]) - 1))] = data.draw(_JSON)
            meta[key] = json.dumps(table)
        blob = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    path = tmp_path / "mut.safetensors"
    path.write_bytes(bytes(raw))
    _only_quantsr_errors(path)

"""``bits`` lives in the config and once in a packed file's metadata; nothing works it out from the codes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.packing.convert import decode_layers, encode_layers, pack_model, to_packed
from quantsr_cli.packing.io import read_metadata, save_model
from quantsr_cli.quant import WeightParams, quantize_
from tests.conftest import run_cli


def _qat(bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = quantize_(build_model("quantsr-c", upscale=2, num_block=2, num_feat=16), QuantConfig("rbd", bits, bits))
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    return model.eval()


def _edit_meta(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header["__metadata__"])
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def _one_error_line(result) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_metadata_bits_come_from_the_config_and_match_every_layer(tmp_path: Path) -> None:
    model = _qat(4)
    assert model.quant_config == QuantConfig("rbd", 4, 4)  # quantize_ records the config on the model
    meta = save_model(model, tmp_path / "m.safetensors", pack=True)
    assert (meta["w_bits"], meta["a_bits"], meta["method"]) == ("4", "4", "rbd")
    rows = decode_layers(meta)
    assert rows and all(r["w_bits"] == 4 and r["a_bits"] == 4 and r["format"] == "u4_row_lsb" for r in rows)
    with pytest.raises(ConfigError, match="body.0.conv1 holds 4-bit weight codes, but the quantization config says W2A2"):
        pack_model(model, QuantConfig("rbd", 2, 2))  # a config that is not the model's is refused, not written


def test_codes_are_packed_at_the_quantizers_bits_even_when_small_values_would_fit_fewer() -> None:
    model = _qat(8)
    layer = model.get_submodule("body.0.conv1")
    with torch.no_grad():
        layer.weight.fill_(-120.0).mul_(layer.w_q.step)  # 8-bit codes -120 + 127 = 7: a 4-bit guess would fit
    assert int(layer.w_q.export(layer.weight).codes.max()) < 16
    packed = to_packed(model).get_submodule("body.0.conv1")
    assert packed.w_bits == 8 and packed.format.value == "u8_row"


    class NoBits(nn.Module):  # exports codes but does not state their bit-width
        def export(self, weight: torch.Tensor) -> WeightParams:
            return WeightParams(torch.zeros_like(weight, dtype=torch.uint8), torch.ones(1), 0.0)

    layer.w_q = NoBits()
    with pytest.raises(ValueError, match="must state its bit-width"):  # refused, not guessed from the codes
        to_packed(model)


def test_a_file_whose_codes_disagree_with_its_metadata_bits_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "w4.safetensors"
    save_model(_qat(4), src, pack=True)

    says_w2 = tmp_path / "says_w2.safetensors"  # the header's bits changed, the 4-bit layers left alone
    says_w2.write_bytes(src.read_bytes())
    _edit_meta(says_w2, lambda m: m.update(w_bits="2"))
    line = _one_error_line(run_cli("eval", "--model", str(says_w2), "--dataset", "Set5"))
    assert str(says_w2) in line and "4-bit weight codes" in line and "w_bits=2" in line

    all_w2 = tmp_path / "all_w2.safetensors"  # every bit field says 2; the codes are still 4-bit rows

    def to_w2(meta: dict) -> None:
        rows = decode_layers(meta)
        for row in rows:
            row.update(w_bits=2, format="u2_row_lsb")
        meta.update(w_bits="2", layers=encode_layers(rows))

    all_w2.write_bytes(src.read_bytes())
    _edit_meta(all_w2, to_w2)
    assert read_metadata(all_w2)["w_bits"] == "2"
    line = _one_error_line(run_cli("info", str(all_w2)))
    assert str(all_w2) in line and "qweight" in line and "shape mismatch" in line

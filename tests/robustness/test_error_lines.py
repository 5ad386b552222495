"""Every error names its file, in one line, without a traceback: wrong-typed metadata in diffusion
files, tensors torch cannot load into a model, and corrupt images whose decoder writes its own
complaints to stderr.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from quantsr_cli.models import build_model
from quantsr_cli.packing import io as packing_io

from .helpers import error_line, fresh_dir, write_png

RGB = (np.random.default_rng(9).random((12, 16, 3)) * 255).astype(np.uint8)


def _only_our_lines(stderr: str) -> None:
    """Nothing but our own lines: no decoder or library chatter, no Python warnings (the decoder's reason may
    be quoted inside our ``error:`` line)."""
    for line in stderr.splitlines():
        low = line.lower()
        if low.startswith("error:"):
            continue
        assert not low.startswith(("lib", "tiff", "corrupt", "premature", "warning")), stderr
        assert "warning" not in low and "libpng" not in low, stderr


DIFFUSION_META = {
    "quant_spec is a list": ("qat", {"quant_spec": "[1, 2]"}),
    "quant_spec is a string": ("qat", {"quant_spec": '"lbq"'}),
    "quant_spec bits are text": ("qat", {"quant_spec": '{"w_bits": "four"}'}),
    "hparams is a list": ("fp", {"hparams": "[]"}),
    "channels are text": ("fp", {"hparams": '{"vae_channels": "ab", "unet_channels": [8, 8]}'}),
    "upscale is text": ("fp", {"hparams": '{"upscale": "4"}'}),
    "heads is a float": ("fp", {"hparams": '{"heads": 2.5}'}),
    "arch is a number": ("fp", {"arch": "7"}),
}


@pytest.mark.parametrize("case", sorted(DIFFUSION_META))
def test_wrong_typed_diffusion_metadata_is_one_line(cli, diffusion_models, tmp_path: Path, case: str) -> None:
    which, changes = DIFFUSION_META[case]
    tensors, meta = packing_io.read_file(diffusion_models[which])
    if "hparams" in changes and changes["hparams"].startswith("{"):
        changes = {"hparams": json.dumps({**json.loads(meta["hparams"]), **json.loads(changes["hparams"])})}
    meta.update(changes)
    path = tmp_path / "bad.safetensors"
    packing_io.save_file(tensors, meta, path)
    src = write_png(tmp_path / "in.png", RGB)
    result = cli("upscale", str(src), "-o", str(tmp_path / "out.png"), "--model", str(path))
    error_line(result, str(path))
    _only_our_lines(result.stderr)


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("quantsr-c", upscale=2, num_block=1, num_feat=16).state_dict()


def _odd_tensor(kind: str, t: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "quantized":
            return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
        if kind == "sparse":
            return t.to_sparse()
        if kind == "meta":
            return torch.empty(t.shape, device="meta")
        return t.to(torch.complex64)


@pytest.mark.parametrize("kind", ["quantized", "sparse", "meta", "complex"])
def test_tensors_torch_cannot_load_name_the_file(cli, tmp_path: Path, kind: str) -> None:
    state = _state_dict()
    state["conv_first.weight"] = _odd_tensor(kind, state["conv_first.weight"])
    path = tmp_path / f"{kind}.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(state, path)
    src = write_png(tmp_path / "in.png", RGB)
    out = fresh_dir(tmp_path / "out")
    result = cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(path))
    error_line(result, str(path), "conv_first.weight")
    _only_our_lines(result.stderr)
    assert list(out.iterdir()) == []


def _png_bytes() -> bytes:
    ok, buf = cv2.imencode(".png", RGB)
    assert ok
    return buf.tobytes()


def _bad_ihdr_crc() -> bytes:
    data = bytearray(_png_bytes())
    data[29] ^= 0xFF
    return bytes(data)


def _bad_idat() -> bytes:
    data = bytearray(_png_bytes())
    at = data.find(b"IDAT") + 8
    data[at] ^= 0xFF  # inside the deflate stream; the chunk CRC is fixed so only zlib complains
    start = data.find(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start:start + 4])
    crc = zlib.crc32(bytes(data[start + 4:start + 8 + length]))
    data[start + 8 + length:start + 12 + length] = struct.pack(">I", crc)
    return bytes(data)


def _bad_tiff() -> bytes:
    ok, buf = cv2.imencode(".tif", RGB)
    data = bytearray(buf.tobytes())
    data[8:] = bytes(len(data) - 8)  # the IFD offset points at zeros
    return bytes(data)


CORRUPT = {"ihdr_crc.png": _bad_ihdr_crc, "idat.png": _bad_idat, "ifd.tif": _bad_tiff}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_image_is_exactly_one_line(cli, tiny_models, tmp_path: Path, name: str) -> None:
    src = tmp_path / name
    src.write_bytes(CORRUPT[name]())
    out = fresh_dir(tmp_path / "out")
    result = cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(tiny_models["packed"]))
    error_line(result, str(src))
    _only_our_lines(result.stderr)
    assert list(out.iterdir()) == []

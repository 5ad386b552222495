"""The diffusion engine on the shared contracts: one round_ste, one arch registry, one strict loader,
shared training data, and a quantizer interface that a new kind plugs into with one registry line."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsr_cli.config import QuantConfig, TrainConfig
from quantsr_cli.data import TrainDataset
from quantsr_cli.diffusion import quantizers
from quantsr_cli.diffusion.ckpt import load_model, save_model
from quantsr_cli.diffusion.qmodel import QuantSpec, calibrate, quant_layers, quantize_model, set_quant_enabled
from quantsr_cli.diffusion.stages import calibration_data, sample_patches
from quantsr_cli.engine.quantize import QuantizeJob
from quantsr_cli.engine.report import model_info
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import ARCHS, arch_names, build_model, probe_model
from quantsr_cli.packing import io as packing_io

PACKAGE = Path(__file__).resolve().parents[1] / "quantsr_cli"
TINY = dict(vae_channels=(8, 16), unet_channels=(16, 32), attn_levels=(1,), heads=2, context_dim=16, context_len=4)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("osd-sr-tiny", **TINY).eval()


def test_one_definition_of_round_ste_and_of_the_arch_registry() -> None:
    defined: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and node.name == "round_ste":
                defined.setdefault("round_ste", []).append(str(path.relative_to(PACKAGE)))
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id.endswith("ARCHS"):
                        defined.setdefault("ARCHS", []).append(str(path.relative_to(PACKAGE)))
    assert defined == {"round_ste": ["quant/primitives.py"], "ARCHS": ["models/registry.py"]}


def test_osd_sr_tiny_is_a_registered_one_step_arch() -> None:
    spec = ARCHS["osd-sr-tiny"]
    assert spec.family == "one-step-diffusion" and arch_names("one-step-diffusion") == ["osd-sr-tiny"]
    assert "osd-sr-tiny" not in arch_names() and set(arch_names()) | {"osd-sr-tiny"} == set(ARCHS)
    model = _tiny()
    assert model.arch == "osd-sr-tiny" and build_model(model.arch, **model.hparams).hparams == model.hparams
    assert probe_model("osd-sr-tiny", **TINY).empty_prompt.is_meta
    with torch.no_grad():
        assert model(torch.rand(1, 3, 5, 7)).shape == (1, 3, 20, 28)
    with pytest.raises(ConfigError, match="diffusion quantize"):
        QuantizeJob(arch="osd-sr-tiny", scale=4, quant=QuantConfig(), train=TrainConfig())
    with pytest.raises(ConfigError, match="describes SR models"):
        model_info(arch="osd-sr-tiny")  # its MAC input would be a 1024x1024 diffusion pass


@pytest.mark.parametrize("change", ["missing", "unexpected", "mis-shaped"])
def test_checkpoint_errors_name_the_file_and_the_key(tmp_path: Path, change: str) -> None:
    model = _tiny()
    spec = QuantSpec(w_bits=4, a_bits=4)
    quantize_model(model, spec)
    path = save_model(model, tmp_path / "q.safetensors", spec=spec)
    tensors, meta = packing_io.read_file(path)
    key = "unet.down.0.res.conv1.lr_u"
    if change == "missing":
        del tensors[key]
    elif change == "unexpected":
        tensors["unet.extra.weight"] = torch.zeros(2)
        key = "unet.extra.weight"
    else:
        tensors[key] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    packing_io.save_file(tensors, meta, bad)
    with pytest.raises(CheckpointError) as err:
        load_model(bad)
    assert str(bad) in str(err.value) and key in str(err.value)


def test_diffusion_files_hold_only_one_step_archs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imdn = build_model("imdn", num_feat=16, num_modules=1)
    path = tmp_path / "imdn.safetensors"
    packing_io.save_file(dict(imdn.state_dict()), {"kind": "diffusion-fp", "arch": "imdn",
                                                   "hparams": '{"num_feat": 16, "num_modules": 1}'}, path)
    with pytest.raises(CheckpointError, match="osd-sr-tiny"):
        load_model(path)


class _MinMaxQuantizer(quantizers.RangeQuantizer):
    """A toy kind: round-to-nearest on the initial range, nothing learnable."""

    def __init__(self, bits: int, num_channels: int = 1, channel_axis: int | None = None) -> None:
        super().__init__(bits, num_channels, channel_axis)
        self.register_buffer("lo", torch.zeros(num_channels))
        self.register_buffer("hi", torch.ones(num_channels))

    @torch.no_grad()
    def init_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo.copy_(lo.reshape(-1).expand_as(self.lo))
        self.hi.copy_(torch.maximum(hi.reshape(-1).expand_as(self.hi), self.lo + 1e-6))
        self.initialized.fill_(True)

    @torch.no_grad()
    def init_from_tensor(self, x: torch.Tensor) -> None:
        flat = self._reduce(x)
        self.init_range(flat.amin(dim=1), flat.amax(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, step = self._view(self.lo, x), self._view((self.hi - self.lo) / self.levels, x)
        return lo + step * torch.clamp(quantizers.round_ste((x - lo) / step), 0, self.levels)


def test_a_new_quantizer_kind_is_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quantizers.QUANTIZERS, "minmax", _MinMaxQuantizer)
    model = _tiny()
    layers = quantize_model(model, QuantSpec(w_bits=2, a_bits=2, quantizer="minmax", smooth=False, lowrank=0, lora=0))
    conv = layers["unet.down.0.res.conv1"]
    assert isinstance(conv.w_q, _MinMaxQuantizer) and conv.w_q.lo.shape == (conv.out_channels,)
    x = torch.rand(2, 3, 4, 4)
    calibrate(model, [x])
    set_quant_enabled(model, True)
    assert all(layer.quant_enabled for layer in quant_layers(model).values())
    w = conv.w_q(conv.quant_input_weight())
    assert max(w[c].unique().numel() for c in range(w.shape[0])) <= 4  # a 2-bit grid per output channel
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def _png_folder(tmp_path: Path) -> Path:
    import cv2

    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate([(40, 52), (36, 36), (20, 60)]):  # the last is smaller than the patch: skipped
        cv2.imwrite(str(folder / f"{i}.png"), (rng.random((h, w, 3)) * 255).astype(np.uint8))
    return folder


def _dihedral(t: torch.Tensor) -> list[torch.Tensor]:
    return [r.flip(-1) if f else r for k in range(4) for r in [torch.rot90(t, k, (-2, -1))] for f in (0, 1)]


def test_patches_are_aligned_crops_of_the_shared_training_images(tmp_path: Path) -> None:
    folder = _png_folder(tmp_path)
    data = TrainDataset([folder], 4, patch_size=32)
    assert len(data.hr) == 2 and data.skipped == [folder / "2.png"]
    lr, hr = sample_patches(data, 6, np.random.default_rng(0))
    assert lr.shape == (6, 3, 8, 8) and hr.shape == (6, 3, 32, 32)
    for lp, hp in zip((lr * 255).round().to(torch.uint8), (hr * 255).round().to(torch.uint8)):
        found = False
        for img_lr, img_hr in zip(data.lr, data.hr):
            for y in range(img_lr.shape[1] - 7):
                for x in range(img_lr.shape[2] - 7):
                    crop_hr = img_hr[:, 4 * y : 4 * y + 32, 4 * x : 4 * x + 32]
                    crops = zip(_dihedral(img_lr[:, y : y + 8, x : x + 8]), _dihedral(crop_hr))
                    found = found or any(torch.equal(a, lp) and torch.equal(b, hp) for a, b in crops)
        assert found
    again = calibration_data([folder], 6, 32, 2, seed=1)
    assert torch.equal(again.lr, calibration_data([folder], 6, 32, 2, seed=1).lr)
    assert not torch.equal(again.lr, calibration_data([folder], 6, 32, 2, seed=2).lr)

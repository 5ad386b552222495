"""Tests of quantsr_cli.models: shapes, official key layouts, loading, detection, block skipping."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import ARCHS, arch_names, build_model, detect_arch, load_weights, read_state_dict
from quantsr_cli.models.loading import model_from_file
from quantsr_cli.models.swinir import shifted_window_mask

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QUANTSR_DATA", REPO.parent / "shared" / "data"))
SCALES = (2, 3, 4)
# small configurations keep the per-test cost low; defaults are exercised where the layout matters
SMALL = {
    "quantsr-c": {"num_block": 3},
    "srresnet": {"num_block": 3},
    "swinir-s": {"depths": [2, 2], "num_heads": [6, 6]},
    "imdn": {"num_modules": 3},
    "spandrel": {"net": "Compact", "cls": "Compact", "params": {"num_feat": 8, "num_conv": 2, "upscale": 3}},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eval(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.double(), b.double()).item()
    return 10 * math.log10(1.0 / mse)


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("arch", sorted(arch_names("sr")))
def test_output_shape_odd_input(arch: str, scale: int) -> None:
    torch.manual_seed(0)
    model = build_model(arch, upscale=scale)
    out = _eval(model, torch.rand(2, 3, 13, 17))
    assert out.shape == (2, 3, 13 * scale, 17 * scale)
    assert torch.isfinite(out).all()
    assert model.arch == arch and model.hparams["upscale"] == scale


def test_swinir_any_size_including_smaller_than_window() -> None:
    model = build_model("swinir-s", upscale=2, **SMALL["swinir-s"])
    for h, w in ((5, 3), (8, 8), (9, 24), (1, 1)):
        assert _eval(model, torch.rand(1, 3, h, w)).shape == (1, 3, 2 * h, 2 * w)


def test_swinir_crop_equals_padded_run() -> None:
    """Padding then cropping is all the model does for non-multiples of the window size."""
    torch.manual_seed(0)
    model = build_model("swinir-s", upscale=3, **SMALL["swinir-s"])
    x = torch.rand(1, 3, 13, 17)
    padded = F.pad(x, (0, 7, 0, 3), mode="reflect")
    torch.testing.assert_close(_eval(model, x), _eval(model, padded)[:, :, :39, :51])


def test_shifted_window_mask() -> None:
    mask = shifted_window_mask(16, 24, 8, 4)
    assert mask.shape == (6, 64, 64)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # the top-left window is one region
    assert (mask[-1] == 0).sum() == 4 * 16 * 16  # the last window holds four 4x4 regions


# ------------------------------------------------------------------------------------ official layouts


def test_imdn_official_keys() -> None:
    expected = ["fea_conv"]
    for k in range(1, 7):
        expected += [f"IMDB{k}.c{i}" for i in range(1, 6)] + [f"IMDB{k}.cca.conv_du.0", f"IMDB{k}.cca.conv_du.2"]
    expected += ["c.0", "LR_conv", "upsampler.0"]
    params = {2: 694_404, 3: 703_059, 4: 715_176}
    for scale in SCALES:
        state = build_model("imdn", upscale=scale).state_dict()
        assert len(state) == 92
        assert list(state) == [f"{name}.{p}" for name in expected for p in ("weight", "bias")]
        assert state["upsampler.0.weight"].shape == (3 * scale**2, 64, 3, 3)
        assert state["IMDB1.c2.weight"].shape == (64, 48, 3, 3)
        assert state["IMDB1.c4.weight"].shape == (16, 48, 3, 3)
        assert state["IMDB1.cca.conv_du.0.weight"].shape == (4, 64, 1, 1)
        assert state["c.0.weight"].shape == (64, 384, 1, 1)
        assert sum(v.numel() for v in state.values()) == params[scale]


def test_swinir_s_official_layout() -> None:
    model = build_model("swinir-s", upscale=4)
    state = model.state_dict()
    n_params = sum(p.numel() for p in model.parameters())
    tables = sum(p.numel() for n, p in model.named_parameters() if n.endswith("relative_position_bias_table"))
    assert n_params == 929_628  # every Parameter (the note's count; buffers excluded)
    assert n_params - tables == 897_228  # the paper's "897K"
    assert len(state) == 366 - 12  # official keys minus the 12 attn_mask buffers (recomputed per size)
    assert state["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape == (225, 6)
    index = state["layers.3.residual_group.blocks.5.attn.relative_position_index"]
    assert index.shape == (64, 64) and index.dtype == torch.int64 and index.max() == 224
    assert state["layers.2.residual_group.blocks.1.attn.qkv.weight"].shape == (180, 60)
    assert state["layers.1.residual_group.blocks.4.mlp.fc1.weight"].shape == (120, 60)
    assert state["layers.0.conv.weight"].shape == (60, 60, 3, 3)
    assert state["patch_embed.norm.weight"].shape == (60,)
    assert state["norm.bias"].shape == (60,)
    assert state["conv_after_body.weight"].shape == (60, 60, 3, 3)
    assert state["upsample.0.weight"].shape == (48, 60, 3, 3)
    assert not any("learnable_shortcut" in k or "attn_mask" in k or k.endswith("_act") for k in state)
    assert "layers.0.learnable_shortcut" in build_model("swinir-s", learnable_shortcut=True).state_dict()


def _official_swinir_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict plus the ``attn_mask`` buffers an official img_size=64 file carries."""
    state = dict(model.state_dict())
    mask = shifted_window_mask(64, 64, 8, 4)
    for name in model.block_names():
        for j in range(1, len(model.get_submodule(name).residual_group.blocks), 2):
            state[f"{name}.residual_group.blocks.{j}.attn_mask"] = mask.clone()
    return state


def test_swinir_loads_official_masks_strictly() -> None:
    torch.manual_seed(0)
    src = build_model("swinir-s", upscale=2, **SMALL["swinir-s"])
    official = _official_swinir_state(src)
    dst = build_model("swinir-s", upscale=2, **SMALL["swinir-s"])
    dst.load_state_dict(official, strict=True)
    x = torch.rand(1, 3, 11, 9)
    torch.testing.assert_close(_eval(dst, x), _eval(src, x))
    load_weights(build_model("swinir-s", upscale=2, **SMALL["swinir-s"]), official, "official.pth")


def test_msrresnet_official_layout() -> None:
    state = build_model("srresnet", upscale=4).state_dict()
    assert len(state) == 74
    assert sum(v.numel() for v in state.values()) == 1_517_571
    assert {"upconv1.weight", "upconv2.weight", "conv_hr.weight", "conv_last.bias", "body.15.conv2.weight"} <= set(
        state
    )
    x2 = build_model("srresnet", upscale=2).state_dict()
    assert "upconv2.weight" not in x2 and x2["upconv1.weight"].shape == (256, 64, 3, 3)
    assert build_model("srresnet", upscale=3).state_dict()["upconv1.weight"].shape == (576, 64, 3, 3)
    assert "body.0.learnable_shortcut" in build_model("srresnet", learnable_shortcut=True).state_dict()


def test_quantsr_c_layout() -> None:
    model = build_model("quantsr-c", upscale=4, num_block=32)
    state = model.state_dict()
    assert isinstance(model.body[31].learnable_shortcut, nn.Parameter)
    assert state["body.31.learnable_shortcut"].shape == (1,)
    tail = {"conv_first.weight", "conv_after_body.weight", "upsample.0.weight", "upsample.2.weight", "conv_last.weight"}
    assert tail <= set(state)
    assert build_model("quantsr-c", upscale=3).state_dict()["upsample.0.weight"].shape == (576, 64, 3, 3)
    assert "upsample.2.weight" not in build_model("quantsr-c", upscale=2).state_dict()
    edsr_m = build_model("quantsr-c", upscale=4, learnable_shortcut=False).state_dict()  # BasicSR EDSR-M keys
    assert len(edsr_m) == 74 and sum(v.numel() for v in edsr_m.values()) == 1_517_571


@pytest.mark.parametrize("arch", sorted(arch_names("sr")))
def test_state_dict_round_trip_and_hparams_rebuild(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, upscale=3, **SMALL[arch])
    hparams = json.loads(json.dumps(model.hparams))
    clone = build_model(arch, **hparams)
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 3, 10, 11)
    torch.testing.assert_close(_eval(clone, x), _eval(model, x))
    assert clone.hparams == model.hparams


# ------------------------------------------------------------------------------- quantization metadata


def _matched(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in model.quant_patterns)
    }


def test_quant_patterns() -> None:
    qc = _matched(build_model("quantsr-c", num_block=3))
    assert sorted(qc) == sorted(f"body.{i}.conv{j}" for i in range(3) for j in (1, 2))
    assert all(isinstance(m, nn.Conv2d) for m in qc.values())
    assert len(_matched(build_model("srresnet", num_block=3))) == 6
    imdn = _matched(build_model("imdn"))
    assert len(imdn) == 6 * 5 + 2 and all(isinstance(m, nn.Conv2d) for m in imdn.values())
    assert "c.0" in imdn and "LR_conv" in imdn and not any("cca" in n or n in ("fea_conv", "upsampler.0") for n in imdn)
    swin = _matched(build_model("swinir-s", **SMALL["swinir-s"]))
    kinds = [type(m).__name__ for m in swin.values()]
    assert kinds.count("Linear") == 4 * 4 and kinds.count("Identity") == 4 * 4 and kinds.count("Conv2d") == 2
    assert "layers.0.residual_group.blocks.1.attn.attn_act" in swin and "conv_after_body" not in swin


def test_attention_activation_points_see_q_k_v_and_softmax() -> None:
    torch.manual_seed(0)
    model = build_model("swinir-s", upscale=2, **SMALL["swinir-s"])
    seen: dict[str, torch.Tensor] = {}
    attn = model.layers[0].residual_group.blocks[1].attn
    for name in ("q_act", "k_act", "v_act", "attn_act"):
        getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
    _eval(model, torch.rand(1, 3, 16, 16))
    assert seen["q_act"].shape == (4, 6, 64, 10)  # (windows, heads, tokens, head_dim)
    probs = seen["attn_act"]
    assert probs.shape == (4, 6, 64, 64)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 6, 64))


# ------------------------------------------------------------------------------------- blocks and skip


BLOCK_ARCHS = sorted(a for a in arch_names("sr") if not ARCHS[a].fallback)
"""Architectures with the residual-block contract (a fallback family's foreign networks have none)."""


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_block_skip_returns_scaled_input(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, upscale=2, learnable_shortcut=True, **SMALL[arch]).eval()
    names = model.block_names()
    assert len(names) == len(model.blocks()) == len(model.feature_points())
    block = model.get_submodule(names[1])
    assert block.skip is False and isinstance(block.learnable_shortcut, nn.Parameter)
    assert block.learnable_shortcut.shape == (1,) and block.learnable_shortcut.item() == 1.0
    with torch.no_grad():
        block.learnable_shortcut.fill_(0.5)
    block.skip = True
    if arch == "swinir-s":
        feat = torch.rand(1, 64, 60)
        out = block(feat, (8, 8), shifted_window_mask(8, 8, 8, 4))
    else:
        feat = torch.rand(1, 64, 6, 7)
        out = block(feat)
    torch.testing.assert_close(out, feat * 0.5)
    # a skipped block's weights no longer affect the model output
    x = torch.rand(1, 3, 9, 10)
    before = _eval(model, x)
    with torch.no_grad():
        for p in block.parameters():
            if p is not block.learnable_shortcut:
                p.add_(1.0)
    torch.testing.assert_close(_eval(model, x), before)


@pytest.mark.parametrize("arch", ["srresnet", "swinir-s", "imdn"])
def test_default_shortcut_is_fixed_buffer(arch: str) -> None:
    model = build_model(arch, **SMALL[arch])
    block = model.blocks()[0]
    assert not isinstance(block.learnable_shortcut, nn.Parameter) and block.learnable_shortcut.item() == 1.0
    assert not any("learnable_shortcut" in k for k in model.state_dict())


@pytest.mark.parametrize("arch", BLOCK_ARCHS)
def test_feature_points_fire_once_per_block(arch: str) -> None:
    model = build_model(arch, upscale=2, **SMALL[arch])
    shapes = []
    for name in model.feature_points():
        model.get_submodule(name).register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    _eval(model, torch.rand(1, 3, 8, 9))
    assert len(shapes) == len(model.block_names())
    assert all(len(s) == 4 and s[0] == 1 for s in shapes)


# ------------------------------------------------------------------------------------ builder errors


@pytest.mark.parametrize(
    ("arch", "hparams"),
    [
        ("nope", {}),
        ("imdn", {"upscale": 5}),
        ("swinir-s", {"upscale": 8}),
        ("quantsr-c", {"upscale": "4"}),
        ("quantsr-c", {"num_block": 0}),
        ("srresnet", {"num_blocks": 16}),
        ("swinir-s", {"depths": [6, 6], "num_heads": [6]}),
        ("swinir-s", {"embed_dim": 64, "num_heads": [6, 6, 6, 6]}),
        ("imdn", {"num_feat": 30}),
        ("srresnet", {"learnable_shortcut": 1}),
    ],
)
def test_build_model_rejects(arch: str, hparams: dict) -> None:
    with pytest.raises(ConfigError):
        build_model(arch, **hparams)


def test_arch_specs() -> None:
    for name, spec in ARCHS.items():
        assert spec.name == name and spec.defaults["upscale"] == 4 and spec.description


# ------------------------------------------------------------------------------------------- loading


def test_read_state_dict_unwraps_params_and_module_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("imdn", upscale=2, **SMALL["imdn"])
    path = tmp_path / "wrapped.pth"
    torch.save({"params": {f"module.{k}": v for k, v in model.state_dict().items()}, "iter": 3}, path)
    state = read_state_dict(path)
    assert list(state) == list(model.state_dict())
    fresh = load_weights(build_model("imdn", upscale=2, **SMALL["imdn"]), state, path)
    x = torch.rand(1, 3, 7, 6)
    torch.testing.assert_close(_eval(fresh, x), _eval(model, x))


def test_read_state_dict_prefers_params_ema(tmp_path: Path) -> None:
    path = tmp_path / "ema.pth"
    torch.save({"params": {"a": torch.zeros(1)}, "params_ema": {"a": torch.ones(1)}}, path)
    assert read_state_dict(path)["a"].item() == 1.0
    torch.save({"state_dict": {"module.b": torch.ones(2)}}, path)
    assert list(read_state_dict(path)) == ["b"]
    torch.save({"model": {"c": torch.ones(2)}}, path)
    assert list(read_state_dict(path)) == ["c"]


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_read_state_dict_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        read_state_dict(garbage)
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as fh:
        pickle.dump({"a": _Evil()}, fh)
    with pytest.raises(CheckpointError, match=r"evil.pth: (refused|not a readable)"):
        read_state_dict(evil)
    evil_zip = tmp_path / "evil_zip.pth"
    torch.save({"a": _Evil()}, evil_zip)
    with pytest.raises(CheckpointError, match=r"evil_zip.pth: refused to unpickle \S*print"):
        read_state_dict(evil_zip)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="list.pth: not a state dict"):
        read_state_dict(listed)
    truncated = tmp_path / "truncated.pth"
    torch.save(build_model("imdn", **SMALL["imdn"]).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        read_state_dict(truncated)


def test_load_weights_strict_errors() -> None:
    src = build_model("imdn", upscale=3).state_dict()
    target = build_model("imdn", upscale=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_weights(target, src, "IMDN_x3.pth")
    message = str(info.value)
    assert message.startswith("IMDN_x3.pth: does not fit imdn")
    assert "shape mismatch upsampler.0.weight (file (27, 64, 3, 3), model (48, 64, 3, 3))" in message
    assert "looks like imdn (upscale=3" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing copied

    partial = dict(build_model("imdn", upscale=4).state_dict())
    del partial["IMDB2.c3.bias"]
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="missing keys IMDB2.c3.bias.*unexpected keys extra.weight"):
        load_weights(target, partial, "w.pth")
    with_shortcut = build_model("srresnet", num_block=2, learnable_shortcut=True).state_dict()
    with pytest.raises(CheckpointError, match="unexpected keys body.0.learnable_shortcut.*learnable_shortcut=True"):
        load_weights(build_model("srresnet", num_block=2), with_shortcut, "w.pth")


# ----------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(
    ("arch", "hparams"),
    [
        ("quantsr-c", {"num_block": 2}),
        ("quantsr-c", {"num_block": 3, "learnable_shortcut": False}),
        ("srresnet", {"num_block": 2}),
        ("srresnet", {"num_block": 1, "learnable_shortcut": True, "num_feat": 32}),
        ("swinir-s", {"depths": [2, 4, 2], "num_heads": [6, 3, 6]}),
        ("swinir-s", {"depths": [2], "num_heads": [4], "embed_dim": 32, "window_size": 4, "learnable_shortcut": True}),
        ("imdn", {"num_modules": 2}),
        ("imdn", {"num_modules": 2, "num_feat": 32, "learnable_shortcut": True}),
    ],
)
def test_detect_arch(arch: str, hparams: dict, scale: int) -> None:
    model = build_model(arch, upscale=scale, **hparams)
    found, detected = detect_arch(model.state_dict())
    assert found == arch
    assert detected == {k: v for k, v in model.hparams.items() if k != "res_scale"}
    rebuilt = build_model(found, **detected).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_detect_arch_official_swinir_and_errors() -> None:
    model = build_model("swinir-s", upscale=4)
    assert detect_arch(_official_swinir_state(model)) == ("swinir-s", model.hparams)
    with pytest.raises(CheckpointError, match="cannot recognise"):
        detect_arch({"foo.weight": torch.zeros(1)}, "foo.pth")
    with pytest.raises(CheckpointError, match="cannot recognise"):  # head/tail keys alone are not EDSR-PyTorch
        detect_arch({"head.0.weight": torch.zeros(1), "tail.0.0.weight": torch.zeros(1)})
    x8 = dict(build_model("imdn", num_modules=1).state_dict())
    x8["upsampler.0.weight"] = torch.zeros(192, 64, 3, 3)
    with pytest.raises(CheckpointError, match="w.pth: scale x8 is not supported"):
        detect_arch(x8, "w.pth")


def test_model_from_file(tmp_path: Path) -> None:
    model = build_model("srresnet", upscale=3, num_block=2)
    path = tmp_path / "srresnet.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    loaded = model_from_file(path)
    assert loaded.arch == "srresnet" and loaded.hparams == model.hparams
    with pytest.raises(CheckpointError, match="holds srresnet weights, not imdn"):
        model_from_file(path, arch="imdn")


# ------------------------------------------------------------------------------------- real weights


def test_imdn_x4_real_weights_close_to_bicubic() -> None:
    weights = DATA / "weights" / "IMDN_x4.pth"
    lr_path = DATA / "benchmarks" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"
    if not weights.is_file() or not lr_path.is_file():
        pytest.skip(f"IMDN_x4.pth or Set5 not found under QUANTSR_DATA={DATA}")
    cv2 = pytest.importorskip("cv2")
    state = read_state_dict(weights)
    assert len(state) == 92 and not any(k.startswith("module.") for k in state)
    arch, hparams = detect_arch(state, weights)
    assert (arch, hparams["upscale"]) == ("imdn", 4)
    model = load_weights(build_model(arch, **hparams), state, weights)
    lr = cv2.imread(str(lr_path), cv2.IMREAD_COLOR)[40:72, 40:72, ::-1].copy()
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float() / 255
    out = _eval(model, x)
    bicubic = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)
    assert out.shape == (1, 3, 128, 128)
    assert _psnr(out.clamp(0, 1), bicubic.clamp(0, 1)) > 25.0


def test_models_import_no_forbidden_modules() -> None:
    code = (
        "import sys, quantsr_cli.models\n"
        "bad = ('typer', 'rich', 'safetensors', 'quantsr_cli.quant', 'quantsr_cli.packing', 'quantsr_cli.engine')\n"
        "print(','.join(m for m in bad if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == ""

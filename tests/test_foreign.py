"""Any SR checkpoint a user brings (issue #22): eleven architectures in their official key layouts, as
``.pth`` and ``.safetensors``, go through ``upscale``, ``quantize --init F`` (detected, no ``--arch``),
``info`` and the packed file's backends.

The packed file's ``torch`` backend must reproduce the fake-quant model that was packed (``qat_last``)
to float32 rounding, on a size that needs the size-requirement padding of window models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("spandrel", reason="spandrel (and a torchvision matching torch) are not installed")

from quantsr_cli.backends import use_backend  # noqa: E402
from quantsr_cli.cli.app import app  # noqa: E402
from quantsr_cli.engine.modelio import load_model  # noqa: E402
from quantsr_cli.models import ARCHS, detect_arch  # noqa: E402
from quantsr_cli.models.loading import read_state_dict  # noqa: E402
from quantsr_cli.packing import PackedModule  # noqa: E402
from quantsr_cli.packing.foreign import read_state_dict_file  # noqa: E402

from tests.zoo import ZOO, write_zoo  # noqa: E402

TRAIN = ("--batch-size", "2", "--patch-size", "32", "--val-every", "0", "--save-every", "2", "--threads", "1")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import cv2
    import numpy as np

    path = tmp_path_factory.mktemp("img") / "lr.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (13, 19, 3), dtype=np.uint8))
    return path


def test_the_zoo_covers_the_issue_list() -> None:
    assert len(ZOO) >= 10
    must = {"realesrgan_rrdbnet", "realesrgan_compact", "swinir_classical", "rcan", "edsr_pytorch"}
    assert must <= set(ZOO) and len({"hat", "span", "omnisr", "dat", "safmn", "plksr"} & set(ZOO)) >= 3


@pytest.mark.parametrize("name", sorted(ZOO))
def test_both_formats_detect_alike_and_upscale(name: str, zoo, image: Path, tmp_path: Path) -> None:
    pth, st = zoo[name]
    _, scale, label = ZOO[name]
    found_pth = detect_arch(read_state_dict(pth))
    found_st = detect_arch(read_state_dict_file(st))
    assert found_pth == found_st
    assert ARCHS[found_pth[0]].display(found_pth[1]) == label and found_pth[1]["upscale"] == scale
    for src in (pth, st):
        out = tmp_path / f"{src.suffix[1:]}.png"
        log = _cli("upscale", str(image), "-o", str(out), "-m", str(src), "--backend", "torch")
        assert f"detected {label} x{scale} in {src.name}" in log
        import cv2

        assert cv2.imread(str(out)).shape == (13 * scale, 19 * scale, 3)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_quantize_init_detects_packs_and_the_packed_file_matches_fake_quant(
        name: str, zoo, tiny_train_dir: Path, tmp_path: Path) -> None:
    pth, st = zoo[name]
    _, scale, label = ZOO[name]
    init = st if sorted(ZOO).index(name) % 2 else pth  # both formats, alternately
    run = tmp_path / "run"
    log = _cli("quantize", "--init", str(init), "--bits", "4", "--iters", "2", "--train-data", str(tiny_train_dir),
               "--run-dir", str(run), *TRAIN)
    assert f"detected {label} x{scale}" in log
    packed_path = run / "model.safetensors"
    packed = load_model(str(packed_path))
    fake = load_model(str(run / "qat_last.safetensors"))
    assert packed.kind == "packed" and fake.kind == "qat" and packed.scale == scale
    n_packed = sum(isinstance(m, PackedModule) for m in packed.model.modules())
    assert n_packed > 0
    if packed.arch == "spandrel":  # the generic rule lists its layers by name
        assert n_packed == len(packed.model.quant_patterns)
    use_backend(packed.model, "torch")
    x = torch.rand(1, 3, 11, 14)  # odd sizes: window models pad to their size requirements
    with torch.no_grad():
        ref, got = fake.model(x), packed.model(x)
    assert got.shape == (1, 3, 11 * scale, 14 * scale)
    assert (ref - got).abs().max().item() <= 1e-4
    use_backend(packed.model, "cpu")  # integer kernels where they apply, the reference elsewhere
    with torch.no_grad():
        cpu = packed.model(x)
    assert (cpu - got).abs().mean().item() <= 2e-3

    info = json.loads(_cli("info", str(packed_path), "--json"))
    assert info["label"] == label and info["kind"] == "packed" and info["w_bits"] == 4
    assert info["quantized_layers"] == n_packed and info["quantized_params"] > 0
    assert info["macs"] > 0 and info["file_bytes"] == packed_path.stat().st_size
    reasons = set(info["fp_layers"].values())
    assert reasons  # the papers' convention: first and last layers stay full precision, and info says why
    if packed.arch == "spandrel":
        assert {"last layer", "upsampler (feeds a pixel shuffle)"} & reasons


def test_info_says_what_stays_full_precision(zoo) -> None:
    text = _cli("info", str(zoo["realesrgan_compact"][0]))
    assert "full precision, first conv: body.0" in text
    assert "full precision, not packable (params by module type): PReLU" in text
    span = json.loads(_cli("info", str(zoo["span"][0]), "--json"))  # SPAN's Conv3XC, folded into one conv each
    assert span["hparams"]["fold"] is True and span["fp_layers"]["conv_1.eval_conv"] == "first conv"
    assert len(load_model(str(zoo["span"][0])).model.quant_patterns) > 10
    assert not any(r.startswith("cannot be packed") for r in span["fp_layers"].values())


def test_rcan_is_not_edsr_and_edsr_pytorch_is_the_builtin(zoo) -> None:
    rcan = detect_arch(read_state_dict(zoo["rcan"][0]))
    edsr = detect_arch(read_state_dict(zoo["edsr_pytorch"][0]))
    assert rcan[0] == "spandrel" and rcan[1]["net"] == "RCAN"
    assert edsr == ("quantsr-c", {"upscale": 2, "num_block": 2, "num_feat": 16, "learnable_shortcut": False})


def test_the_built_in_equivalent_wins_and_the_generic_path_is_on_request(tmp_path: Path) -> None:
    from quantsr_cli.models import build_model
    from quantsr_cli.models.loading import detect_as

    from spandrel.architectures.SwinIR import SwinIR

    light = SwinIR(img_size=64, embed_dim=12, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2.0, upscale=2,
                   upsampler="pixelshuffledirect")  # SwinIR-S's layout (official keys), narrower
    state = light.state_dict()
    assert detect_arch(state)[0] == "swinir-s"  # spandrel knows lightweight SwinIR too; ours comes first
    arch, hparams = detect_as(state, "spandrel")
    assert (arch, hparams["net"]) == ("spandrel", "SwinIR")
    imdn = build_model("imdn", num_modules=2).state_dict()
    assert detect_as(imdn, "spandrel")[1]["net"] == "quantsr:imdn"  # spandrel has no IMDN: ours, generic rule


def test_conflicting_arch_is_one_line_naming_both(zoo, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["quantize", "--arch", "swinir-s", "--init", str(zoo["rcan"][0]), "--iters",
                                      "1", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "--arch swinir-s" in message and "RCAN (spandrel)" in message and "\n" not in message
    assert not (tmp_path / "r").exists()


def test_unsupported_foreign_models_are_named(tmp_path: Path) -> None:
    from spandrel.architectures.DnCNN import DnCNN

    from quantsr_cli.errors import CheckpointError

    with pytest.raises(CheckpointError, match="DnCNN weights for a x1"):
        detect_arch(DnCNN().state_dict(), tmp_path / "dncnn.pth")


@pytest.mark.slow
def test_published_imdn_through_the_generic_path_ptq_w8a8_keeps_set5(shared_data: Path, tmp_path: Path) -> None:
    """The real IMDN x4 weights, taken down the spandrel family's generic path (``--arch spandrel``: the
    generic rule, not the built-in IMDN's), PTQ-only at W8A8: Set5 >= 32.0 dB (FP 32.21; measured 32.11)."""
    run = tmp_path / "run"
    out = _cli("quantize", "--init", str(shared_data / "weights" / "IMDN_x4.pth"), "--arch", "spandrel", "--bits",
               "8", "--iters", "0", "--run-dir", str(run), "--threads", "2", "--json")
    summary = json.loads(out[out.index("{"):])
    assert summary["best_psnr"] >= 32.0, summary
    meta = json.loads(_cli("info", summary["out"], "--json"))
    assert meta["arch"] == "spandrel" and meta["hparams"]["net"] == "quantsr:imdn" and meta["w_bits"] == 8
    result = json.loads(_cli("eval", "--model", summary["out"], "--backend", "torch", "--json",
                             "--data-root", str(shared_data / "benchmarks")))
    assert abs(result["datasets"]["Set5"]["psnr"] - summary["best_psnr"]) < 0.01


def test_the_cupy_engine_runs_foreign_models_layer_by_layer(zoo) -> None:
    """No fused plan knows a foreign network: the GPU engine's planner says it runs it layer by layer."""
    from quantsr_cli.backends.engine_plans import PRECISIONS, build_plan
    from quantsr_cli.config import QuantConfig
    from quantsr_cli.packing.convert import to_packed
    from quantsr_cli.quant import calibrate_, quantize_

    model = load_model(str(zoo["realesrgan_compact"][0])).model
    quantize_(model, QuantConfig(w_bits=4, a_bits=4))
    calibrate_(model, torch.rand(2, 3, 8, 8))
    plan, note = build_plan(to_packed(model.eval()), torch.device("cpu"), PRECISIONS["fp16"])
    assert plan is None and note.startswith("layer by layer")


def test_a_foreign_teacher_distills_on_its_output(zoo, tiny_train_dir: Path, tmp_path: Path) -> None:
    """distill --teacher accepts a foreign checkpoint; with no residual blocks to match, SFD's extra term is
    the L1 distance to the teacher's output."""
    from quantsr_cli.models import build_model

    torch.manual_seed(0)
    init = tmp_path / "imdn.pth"
    torch.save(build_model("imdn", num_modules=2).state_dict(), init)
    ptq = tmp_path / "ptq"
    _cli("quantize", "--init", str(init), "--bits", "4", "--iters", "0", "--train-data", str(tiny_train_dir),
         "--run-dir", str(ptq), *TRAIN)
    run = tmp_path / "distill"
    log = _cli("distill", "--model", str(ptq / "qat_last.safetensors"), "--teacher", str(zoo["realesrgan_compact"][1]),
               "--iters", "2", "--train-data", str(tiny_train_dir), "--run-dir", str(run), *TRAIN)
    assert "teacher: detected Compact (spandrel) x4" in log
    assert json.loads(read_metadata_extra(run / "model.safetensors"))["distill"]["teacher"] == "realesrgan_compact.safetensors"


def read_metadata_extra(path: Path) -> str:
    from quantsr_cli.packing.io import read_metadata

    return read_metadata(path)["extra"]

"""Optional activation points (IMDN's ``cat_act``/``out_act``) and layers added to a continued model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.packing.io import load_model_file, read_metadata
from quantsr_cli.quant import ActQuant, QConv2d, add_layers_, layer_plan, quantize_, quantized_layers
from quantsr_cli.quant.calibrate import initialize_pending_, initialize_quantizers, pending_quantizers

SMALL = {"num_modules": 2, "num_feat": 16}
RULES = {"IMDB*.cat_act": 8, "IMDB*.out_act": "w8a8", "upsampler.0": 8}


def test_points_stay_full_precision_unless_a_rule_quantizes_them() -> None:
    model = build_model("imdn", **SMALL)
    assert "IMDB1.cat_act" not in layer_plan(model, QuantConfig())  # the architecture's rule leaves them FP
    official = set(build_model("imdn", **SMALL).state_dict())
    quantize_(model, QuantConfig())
    assert isinstance(model.IMDB1.cat_act, torch.nn.Identity)
    assert not any("cat_act" in k or "out_act" in k for k in model.state_dict())
    assert {k for k in official} <= set(model.state_dict())  # official keys unchanged

    ruled = quantize_(build_model("imdn", **SMALL), QuantConfig(layers=RULES))
    assert isinstance(ruled.IMDB2.cat_act, ActQuant) and ruled.IMDB2.cat_act.a_bits == 8
    assert isinstance(ruled.IMDB1.out_act, ActQuant) and ruled.upsampler[0].w_bits == 8
    with pytest.raises(ConfigError, match="matches no quantizable"):  # other Identity modules stay unreachable
        layer_plan(build_model("srresnet", upscale=2, num_block=2), QuantConfig(layers={"*.cat_act": 8}))


def test_the_points_quantize_what_they_say() -> None:
    torch.manual_seed(0)
    model = quantize_(build_model("imdn", **SMALL), QuantConfig(layers=RULES)).eval()
    seen = {}
    model.IMDB1.cca.register_forward_pre_hook(lambda m, i: seen.setdefault("cat", i[0]))
    model.IMDB1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    with torch.no_grad():
        model(torch.rand(1, 3, 12, 12))
    for name, point in (("cat", model.IMDB1.cat_act), ("out", model.IMDB1.out_act)):
        step = point.export().step
        codes = seen[name] / step
        assert torch.allclose(codes, codes.round(), atol=1e-3), name  # on the 8-bit grid of the point's step
        assert codes.round().unique().numel() > 16  # and finer than a 4-bit one


def test_add_layers_swaps_only_new_layers_and_refuses_changes() -> None:
    torch.manual_seed(0)
    model = quantize_(build_model("imdn", **SMALL), QuantConfig())
    initialize_quantizers(model, torch.rand(2, 3, 16, 16))  # a trained model's quantizers are initialised
    c1 = model.IMDB1.c1
    before = set(quantized_layers(model))
    added = add_layers_(model, QuantConfig(layers=RULES))
    assert set(added) == {"IMDB1.cat_act", "IMDB2.cat_act", "IMDB1.out_act", "IMDB2.out_act", "upsampler.0"}
    assert model.IMDB1.c1 is c1 and set(quantized_layers(model)) == before | set(added)
    assert isinstance(model.upsampler[0], QConv2d) and model.quant_config.layers
    assert pending_quantizers(model)  # the new ones wait for data
    assert initialize_pending_(model, torch.rand(2, 3, 16, 16)) == 6  # 4 points + upsampler act and weights
    assert not pending_quantizers(model) and model.training
    with pytest.raises(ConfigError, match=r"IMDB1\.c1 is w4a4 in the model being continued; the rules make it w2a2"):
        add_layers_(model, QuantConfig(layers={**RULES, "IMDB1.c1": 2}))
    with pytest.raises(ConfigError, match=r"c\.0 is w4a4 .* full precision"):
        add_layers_(model, QuantConfig(layers={**RULES, "c.0": "fp"}))


def test_quantize_model_with_rules_adds_points_to_the_written_file(tmp_path: Path, tiny_train_dir: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "imdn.pth"
    torch.save(build_model("imdn", **SMALL).state_dict(), init)
    common = ("--batch-size", "2", "--patch-size", "32", "--val-every", "0", "--threads", "1",
              "--train-data", str(tiny_train_dir))
    runner = CliRunner()
    first = runner.invoke(app, ["quantize", "--init", str(init), "--iters", "0", "--run-dir", str(tmp_path / "a"),
                                *common])
    assert first.exit_code == 0, first.output
    start = tmp_path / "a" / "model.safetensors"
    config = tmp_path / "points.yaml"
    config.write_text('layers:\n  "IMDB*.cat_act": 8\n  "IMDB*.out_act": 8\n')
    second = runner.invoke(app, ["quantize", "--model", str(start), "--config", str(config), "--iters", "2",
                                 "--run-dir", str(tmp_path / "b"), *common])
    assert second.exit_code == 0, second.output
    assert "4 more layers quantized by the layers rules" in second.output
    out = tmp_path / "b" / "model.safetensors"
    assert json.loads(read_metadata(out)["layer_bits"]) == [["IMDB*.cat_act", 8, 8], ["IMDB*.out_act", 8, 8]]
    packed = load_model_file(out)  # rebuilds from its metadata alone
    names = set(quantized_layers(load_model_file(tmp_path / "b" / "qat_last.safetensors")))
    assert {"IMDB1.cat_act", "IMDB2.out_act", "IMDB1.c1"} <= names
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert packed(x).shape == (1, 3, 40, 40)
    again = runner.invoke(app, ["quantize", "--model", str(out), "--iters", "2", "--run-dir", str(tmp_path / "d"),
                                *common])  # continuing a file with rules, no rules given: the file's are kept
    assert again.exit_code == 0, again.output
    kept = tmp_path / "d" / "model.safetensors"
    assert json.loads(read_metadata(kept)["layer_bits"]) == [["IMDB*.cat_act", 8, 8], ["IMDB*.out_act", 8, 8]]
    assert isinstance(load_model_file(kept).IMDB2.cat_act, torch.nn.Module)
    assert "IMDB2.cat_act" in quantized_layers(load_model_file(tmp_path / "d" / "qat_last.safetensors"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("layers:\n  IMDB1.c1: 2\n")
    refused = runner.invoke(app, ["quantize", "--model", str(start), "--config", str(bad), "--iters", "2",
                                  "--run-dir", str(tmp_path / "c"), *common])
    assert refused.exit_code == 1 and isinstance(refused.exception, ConfigError)
    assert "IMDB1.c1 is w4a4 in the model being continued" in str(refused.exception)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="openvino not installed (pip install 'quantsr[cpu-fast]')")
def test_openvino_runs_the_8bit_points_and_upsampler_in_u8() -> None:
    """With the points and the upsampler at 8 bits, every concatenation and every conv but the first and
    the CCA's 1x1 pair runs in u8/i8 in OpenVINO, and the output still equals the torch reference."""
    from quantsr_cli.backends import use_backend
    from quantsr_cli.backends.export_openvino import compile_model, convert
    from quantsr_cli.packing.convert import to_packed

    torch.manual_seed(0)
    model = quantize_(build_model("imdn", upscale=2, **SMALL), QuantConfig(layers=RULES)).train()
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 16))
    packed = use_backend(to_packed(model.eval()), "torch")
    compiled = compile_model(convert(packed), threads=1)
    kinds: dict[str, list[str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kinds.setdefault(info["layerType"].astype(str), []).append(info["runtimePrecision"].astype(str))
    assert all(p in ("u8", "i8") for p in kinds["Concatenation"]), kinds["Concatenation"]
    float_convs = [p for p in kinds["Convolution"] if p not in ("u8", "i8")]
    assert len(float_convs) == 1 + 2 * SMALL["num_modules"], kinds["Convolution"]  # fea_conv + CCA 1x1 pairs
    x = torch.rand(1, 3, 12, 9)
    with torch.no_grad():
        ref = packed(x)
    got = torch.from_numpy(compiled.create_infer_request().infer({0: x.numpy()})[0].copy())
    diff = (got - ref).abs()
    assert float(diff.mean()) < 1e-3 and float((diff > 1 / 255).float().mean()) < 0.02, float(diff.max())

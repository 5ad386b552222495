"""Per-layer bits (a ``layers:`` config key), post-training quantization (``--iters 0``) and the honest start
of a run from random weights (issue #22)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from quantsr_cli.config import QuantConfig
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import build_model
from quantsr_cli.packing.convert import decode_layers
from quantsr_cli.packing.io import load_model_file, read_file, read_metadata, save_file
from quantsr_cli.quant import layer_plan, quantize_

PTQ = ("--iters", "0", "--batch-size", "2", "--patch-size", "32", "--val-every", "0", "--threads", "1")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _bits(path: Path) -> dict[str, tuple[int, int | None]]:
    return {e["name"]: (e.get("w_bits"), e.get("a_bits")) for e in decode_layers(read_metadata(path))}


def test_rules_plan_override_add_and_drop_layers() -> None:
    model = build_model("imdn", num_modules=2)
    config = QuantConfig(w_bits=4, a_bits=4, layers={"IMDB1.*": 2, "c.0": "fp", "fea_conv": 8, "IMDB2.c5": "w4a8"})
    plan = layer_plan(model, config)
    assert plan["IMDB1.c1"] == plan["IMDB1.c5"] == (2, 2)  # a rule changes the rule's layers
    assert plan["fea_conv"] == (8, 8)  # ... quantizes one the IMDN rule keeps FP
    assert "c.0" not in plan  # ... keeps one FP
    assert plan["IMDB2.c5"] == (4, 8) and plan["IMDB2.c1"] == plan["LR_conv"] == (4, 4)
    assert "IMDB1.cca.conv_du.0" in plan  # IMDB1.* reaches the FP-by-rule CCA convs too, at the rule's bits
    quantize_(model, config)
    assert (model.IMDB1.c2.w_bits, model.IMDB1.c2.a_bits) == (2, 2) and model.fea_conv.w_bits == 8
    assert type(model.c[0]) is torch.nn.Conv2d
    with pytest.raises(ConfigError, match="matches no quantizable"):
        layer_plan(build_model("imdn", num_modules=2), QuantConfig(layers={"nothing.here": 4}))


def test_overridden_layers_have_the_requested_bits_in_the_packed_file(tmp_path: Path, tiny_train_dir: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "imdn.pth"
    torch.save(build_model("imdn", num_modules=2).state_dict(), init)
    config = tmp_path / "bits.yaml"
    config.write_text('layers:\n  "IMDB1.*": 2\n  c.0: fp\n  fea_conv: 8\n  "IMDB2.c5": w4a8\n')
    run = tmp_path / "run"
    _cli("quantize", "--init", str(init), "--bits", "4", "--config", str(config), "--train-data", str(tiny_train_dir),
         "--run-dir", str(run), *PTQ)
    packed = run / "model.safetensors"
    bits = _bits(packed)
    assert bits["IMDB1.c1"] == bits["IMDB1.c4"] == (2, 2) and bits["fea_conv"] == (8, 8)
    assert bits["IMDB2.c5"] == (4, 8) and bits["IMDB2.c1"] == bits["LR_conv"] == (4, 4)
    assert "c.0" not in bits and "upsampler.0" not in bits
    meta = read_metadata(packed)
    assert (meta["w_bits"], meta["a_bits"]) == ("4", "4")
    assert json.loads(meta["layer_bits"]) == [["IMDB1.*", 2, 2], ["c.0", 32, 32], ["fea_conv", 8, 8],
                                              ["IMDB2.c5", 4, 8]]
    model = load_model_file(packed)  # the layers agree with the recorded rules
    assert model.quant_config.bits_for("IMDB1.c3") == (2, 2)
    qat = load_model_file(run / "qat_last.safetensors")  # the fake-quant file rebuilds with the same rules
    assert qat.IMDB1.c1.w_bits == 2 and type(qat.c[0]) is torch.nn.Conv2d
    info = json.loads(_cli("info", str(packed), "--json", "--layers"))
    rows = {r["name"]: (r["w_bits"], r["a_bits"]) for r in info["layers"]}
    assert rows["IMDB1.c2"] == (2, 2) and rows["fea_conv"] == (8, 8) and rows["c.0"] == (32, 32)
    assert info["fp_layers"]["c.0"] == "per-layer rule 'c.0': fp"

    tensors, raw = read_file(packed)  # a file whose layers disagree with its recorded rules is refused
    rules = json.loads(raw["layer_bits"])
    rules[-1] = ["IMDB2.c5", 2, 8]
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, {**raw, "layer_bits": json.dumps(rules)}, forged)
    with pytest.raises(CheckpointError, match="IMDB2.c5 holds 4-bit weight codes, but the file's metadata says"):
        load_model_file(forged)


def test_rules_reaching_only_layers_that_cannot_be_packed_are_refused() -> None:
    model = build_model("imdn", num_modules=2)
    model.unquantizable = {"IMDB1.c1": "its weights are read outside its own forward"}  # as the generic rule sets
    with pytest.raises(ConfigError, match=r"IMDB1\.c1 cannot be quantized \(its weights are read outside"):
        layer_plan(model, QuantConfig(layers={"IMDB1.c1": 8}))
    broad = layer_plan(model, QuantConfig(layers={"IMDB1.*": 8}))  # a broad rule skips it, takes the rest
    assert "IMDB1.c1" not in broad and broad["IMDB1.c2"] == (8, 8)
    assert "IMDB1.c1" not in layer_plan(model, QuantConfig())  # and so does the architecture's own rule


def test_ptq_calibrates_and_packs_without_training(tmp_path: Path, tiny_train_dir: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "msr.pth"
    torch.save({"params": build_model("srresnet", upscale=2, num_block=2).state_dict()}, init)
    run = tmp_path / "run"
    log = _cli("quantize", "--init", str(init), "--bits", "8", "--train-data", str(tiny_train_dir),
               "--run-dir", str(run), "--json", *PTQ)
    assert "calibrated 4 layers on 2 patches of 32 px" in log and "MSE step search" in log
    summary = json.loads(log[log.index("{"):])
    assert summary["iters"] == 0 and Path(summary["out"]).is_file() and not (run / "checkpoints").exists()
    meta = read_metadata(summary["out"])
    assert json.loads(meta["extra"])["ptq"] is True and meta["kind"] == "packed" and meta["arch"] == "srresnet"


def test_ptq_needs_pretrained_weights(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["quantize", "--arch", "imdn", "--iters", "0", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code != 0 and "needs pretrained weights: pass --init FILE" in str(result.exception)


def test_a_random_start_says_so_times_itself_and_points_to_the_official_weights(
        tmp_path: Path, tiny_train_dir: Path) -> None:
    config = tmp_path / "log.yaml"
    config.write_text("log_every: 1\n")
    log = _cli("quantize", "--bits", "2", "--arch", "swinir-s", "--blocks", "1", "--iters", "3", "--config",
               str(config), "--batch-size", "1", "--patch-size", "32", "--val-every", "0", "--save-every", "3",
               "--threads", "1", "--train-data", str(tiny_train_dir), "--run-dir", str(tmp_path / "run"))
    lines = log.splitlines()
    notice = next(ln for ln in lines if "from random weights" in ln and "official weights" in ln)
    assert "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x" in notice and "--init" in notice
    assert lines.index(notice) < 4  # at the start, before data loading
    assert any(ln.startswith("timing: ") and "iterations take about" in ln for ln in lines)

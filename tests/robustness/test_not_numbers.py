"""Numbers that are not numbers are refused: NaN/Inf in model tensors at load, NaN/Inf in a model's
output, ``nan``/``inf`` for numeric options; JSON outputs never hold ``NaN``/``Infinity``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from quantsr_cli.models import build_model
from quantsr_cli.packing import io as packing_io

from .helpers import QUICK_TRAIN, error_line, fresh_dir, strict_json, usage_error, write_png

RGB = (np.random.default_rng(5).random((12, 16, 3)) * 255).astype(np.uint8)


def _poisoned(kind: str, folder: Path, value: float) -> Path:
    torch.manual_seed(0)
    model = build_model("quantsr-c", upscale=2, num_block=1, num_feat=16)
    with torch.no_grad():
        model.body[0].conv2.weight[0, 0, 0, 0] = value
    if kind == "pth":
        path = folder / "poisoned.pth"
        torch.save({"params": model.state_dict()}, path)
    else:
        path = folder / "poisoned.safetensors"
        packing_io.save_model(model, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_model_tensors_are_refused_at_load(cli, tmp_path: Path, kind: str, value: float) -> None:
    model = _poisoned(kind, tmp_path, value)
    src = write_png(tmp_path / "in.png", RGB)
    out = fresh_dir(tmp_path / "out")
    error_line(cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(model)), str(model),
               "body.0.conv2.weight")
    assert list(out.iterdir()) == []
    error_line(cli("eval", "--weights" if kind == "pth" else "--model", str(model), "--dataset", str(out)),
               str(model))


def _overflowing(folder: Path) -> Path:
    """Finite weights whose output overflows float32 (inf - inf = NaN)."""
    torch.manual_seed(0)
    model = build_model("quantsr-c", upscale=2, num_block=1, num_feat=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(1e30)
    path = folder / "overflow.safetensors"
    packing_io.save_model(model, path)
    return path


def test_nan_output_is_an_error_not_a_black_image(cli, tmp_path: Path) -> None:
    model = _overflowing(tmp_path)
    src = write_png(tmp_path / "in.png", RGB)
    out = fresh_dir(tmp_path / "out")
    error_line(cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(model)), str(src), "NaN")
    assert list(out.iterdir()) == []
    ds = fresh_dir(tmp_path / "ds")
    write_png(ds / "a.png", np.tile(RGB, (2, 2, 1)))
    error_line(cli("eval", "--model", str(model), "--dataset", str(ds), "--json",
                   env={"QUANTSR_CACHE": str(tmp_path / "cache")}), str(model), "NaN")


OPTIONS = {
    "quantize --lr nan": (["quantize", "--arch", "quantsr-c", "--scale", "2", "--bits", "4"], "--lr", "nan"),
    "quantize --lr inf": (["quantize", "--arch", "quantsr-c", "--scale", "2", "--bits", "4"], "--lr", "inf"),
    "quantize --ema-decay nan": (["quantize", "--arch", "quantsr-c", "--scale", "2", "--bits", "4"],
                                 "--ema-decay", "nan"),
    "quantize --feature-weight -inf": (["quantize", "--model", "{qat}", "--distill", "{fp}"],
                                       "--feature-weight", "-inf"),
    "slim --start-ratio nan": (["slim", "--model", "{student4}", "--target-blocks", "2"], "--start-ratio", "nan"),
    "distill --feature-weight nan": (["distill", "--model", "{student}", "--teacher", "{teacher}"],
                                     "--feature-weight", "nan"),
    "distill --lr -inf": (["distill", "--model", "{student}", "--teacher", "{teacher}"], "--lr", "-inf"),
}


@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_numeric_options_reject_nan_and_inf(cli, tiny_models, small_train_dir, tmp_path: Path, case: str) -> None:
    args, option, value = OPTIONS[case]
    args = [a.format(**{k: str(v) for k, v in tiny_models.items()}) for a in args]
    run_dir = tmp_path / "run"
    result = cli(*args, option, value, "--run-dir", str(run_dir), "--train-data", str(small_train_dir), *QUICK_TRAIN)
    usage_error(result, option)
    assert not run_dir.exists()


def test_json_outputs_are_valid_json(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    """A run without validation has no best PSNR: that is ``null``, never ``-Infinity``."""
    run_dir = tmp_path / "run"
    result = cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--json",
                 "--train-data", str(small_train_dir), *QUICK_TRAIN)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = strict_json(result.stdout)
    assert summary["best_psnr"] is None
    assert strict_json((run_dir / "summary.json").read_text()) == json.loads(result.stdout)
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    assert lines and all(isinstance(strict_json(line), dict) for line in lines)
    meta = packing_io.read_metadata(run_dir / "qat_last.safetensors")
    for key in ("hparams", "extra"):
        strict_json(meta[key])

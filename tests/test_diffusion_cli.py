"""`quantsr diffusion train/quantize` wiring and `eval` of the resulting files."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli


def test_train_quantize_and_eval_tiny_diffusion_model(tmp_path: Path, tiny_train_dir: Path) -> None:
    train = run_cli("diffusion", "train", "--run-dir", str(tmp_path / "run"), "--iters", "1", "--ae-iters", "1",
                    "--batch-size", "2", "--train-data", str(tiny_train_dir))
    assert train.returncode == 0, train.stderr
    fp = train.stdout.strip().splitlines()[-1]
    out = tmp_path / "q.safetensors"
    quant = run_cli("diffusion", "quantize", "--model", fp, "--bits", "2", "--iters", "1", "--stages", "rpq",
                    "--order", "forward", "--calib-patches", "4", "--batch-size", "2",
                    "--train-data", str(tiny_train_dir), "-o", str(out))
    assert quant.returncode == 0, quant.stderr
    result = run_cli("eval", "--model", str(out), "--dataset", "Set5", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["label"].startswith("osd-sr-tiny x4 W2A2")
    assert 5 < report["datasets"]["Set5"]["psnr"] < 40
    bad = run_cli("diffusion", "quantize", "--model", fp, "--stages", "trq", "-o", str(tmp_path / "x.safetensors"),
                  "--train-data", str(tiny_train_dir))
    assert bad.returncode == 1 and "--trq-timestep" in bad.stderr


def test_sweep_scores_each_timestep_and_selects_one(tmp_path: Path, tiny_train_dir: Path) -> None:
    train = run_cli("diffusion", "train", "--run-dir", str(tmp_path / "run"), "--iters", "1", "--ae-iters", "1",
                    "--batch-size", "2", "--train-data", str(tiny_train_dir))
    assert train.returncode == 0, train.stderr
    fp = train.stdout.strip().splitlines()[-1]
    common = ["diffusion", "sweep", "--model", fp, "-t", "999", "-t", "249", "--retrain-iters", "1",
              "--calib-patches", "4", "--batch-size", "2", "--train-data", str(tiny_train_dir)]
    res = run_cli(*common, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [r["timestep"] for r in report["rows"]] == [999, 249]
    best = max(report["rows"], key=lambda r: r["image_psnr_vs_ref"])
    assert report["selected"] == best["timestep"]
    assert report["rows"][0]["amplification"] > 14 > report["rows"][1]["amplification"]
    text = run_cli(*common)
    assert text.returncode == 0 and text.stdout.strip().splitlines()[-1] == f"selected_timestep={report['selected']}"
    bad = run_cli(*common, "--retrain-target", "hr")
    assert bad.returncode == 1 and "--retrain-target" in bad.stderr

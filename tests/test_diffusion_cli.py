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

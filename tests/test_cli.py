"""The command line: help, exit codes, one-line errors, eval acceptance numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from tests.conftest import run_cli

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("quantize", "slim", "distill", "eval", "upscale", "pack", "info"):
        assert command in result.output


def test_unknown_option_is_usage_error() -> None:
    result = run_cli("eval", "--no-such-flag")
    assert result.returncode == 2


def test_missing_dataset_is_one_line_error(tmp_path: Path, shared_data: Path) -> None:
    result = run_cli("eval", "--weights", str(shared_data / "weights" / "IMDN_x4.pth"), "--dataset",
                     str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nope" in lines[0]


def test_weights_of_wrong_arch_are_refused(shared_data: Path) -> None:
    result = run_cli("eval", "--arch", "quantsr-c", "--weights", str(shared_data / "weights" / "IMDN_x4.pth"),
                     "--dataset", "Set5")
    assert result.returncode == 1
    assert "IMDN_x4.pth" in result.stderr and "Traceback" not in result.stderr


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    result = run_cli("eval", "--model", str(tmp_path / "missing.safetensors"), env={"QUANTSR_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("args", [["--bits", "3"], ["--scale", "5"], ["--iters", "-1"]])
def test_bad_numbers_are_rejected(args: list[str]) -> None:
    result = run_cli("quantize", "--arch", "quantsr-c", *args)
    assert result.returncode in (1, 2)
    assert "Traceback" not in result.stderr


def test_eval_imdn_x4_set5_reproduces_published_psnr(shared_data: Path) -> None:
    result = run_cli("eval", "--arch", "imdn", "--weights", str(shared_data / "weights" / "IMDN_x4.pth"),
                     "--dataset", "Set5", "--scale", "4", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    set5 = out["datasets"]["Set5"]
    assert abs(set5["psnr"] - 32.21) <= 0.01
    assert abs(set5["ssim"] - 0.8948) <= 0.0005
    assert set(set5["images"]) == {"baby", "bird", "butterfly", "head", "woman"}
    assert 28.3 < set5["bicubic"]["psnr"] < 28.5


@pytest.mark.slow
def test_eval_imdn_published_numbers_set14_and_x2(shared_data: Path) -> None:
    result = run_cli("eval", "--arch", "imdn", "--weights", str(shared_data / "weights" / "IMDN_x4.pth"),
                     "--dataset", "Set5", "--dataset", "Set14", "--json")
    out = json.loads(result.stdout)
    assert abs(out["datasets"]["Set14"]["psnr"] - 28.58) <= 0.01
    result = run_cli("eval", "--weights", str(shared_data / "weights" / "IMDN_x2.pth"), "--dataset", "Set5", "--json")
    assert abs(json.loads(result.stdout)["datasets"]["Set5"]["psnr"] - 38.00) <= 0.01

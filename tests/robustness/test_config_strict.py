"""Configuration is what it says: ``--preset`` takes a bundled preset name only (files go through
``--config``), duplicate keys in a YAML file are an error, and a ``--run-dir`` that is a file is an error
before any data is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import QUICK_TRAIN, error_line

SHORT = QUICK_TRAIN


@pytest.mark.parametrize("form", ["absolute", "relative", "with .yaml", "bundled dir traversal"])
def test_preset_takes_a_bundled_name_only(cli, tiny_models, small_train_dir, tmp_path: Path, form: str) -> None:
    options = tmp_path / "mine.yaml"
    options.write_text("arch: quantsr-c\nscale: 2\nbits: 4\n")
    value = {"absolute": str(tmp_path / "mine"), "relative": "mine", "with .yaml": str(options),
             "bundled dir traversal": "../presets/imdn_x4_w4a4"}[form]
    run_dir = tmp_path / "run"
    result = cli("quantize", "--preset", value, "--run-dir", str(run_dir), "--train-data", str(small_train_dir),
                 *SHORT, cwd=tmp_path)
    error_line(result, "--preset", "--config")
    assert not run_dir.exists()


def test_duplicate_yaml_keys_are_an_error(cli, small_train_dir, tmp_path: Path) -> None:
    config = tmp_path / "opts.yaml"
    config.write_text("arch: quantsr-c\nscale: 2\nbits: 4\nlr: 0.001\nblocks: 1\nlr: 0.0005\n")
    run_dir = tmp_path / "run"
    result = cli("quantize", "--config", str(config), "--run-dir", str(run_dir), "--train-data",
                 str(small_train_dir), *SHORT)
    line = error_line(result, str(config), "lr")
    assert "duplicate" in line
    assert not run_dir.exists()
    nested = tmp_path / "nested.yaml"
    nested.write_text("arch: quantsr-c\nmilestones: [1, 2]\nmilestones: [4]\n")
    error_line(cli("quantize", "--config", str(nested), "--run-dir", str(run_dir), *SHORT), str(nested), "milestones")


def test_run_dir_that_is_a_file_is_refused_before_data_loads(cli, tiny_models, tmp_path: Path) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    missing = tmp_path / "no_such_training_data"
    for args in (["quantize", "--model", str(tiny_models["qat"])],
                 ["slim", "--model", str(tiny_models["student4"]), "--target-blocks", "2"],
                 ["distill", "--model", str(tiny_models["student"]), "--teacher", str(tiny_models["teacher"])]):
        line = error_line(cli(*args, "--run-dir", str(blocker), "--train-data", str(missing), *SHORT), str(blocker))
        assert str(missing) not in line
    line = error_line(cli("diffusion", "train", "--run-dir", str(blocker), "--iters", "1", "--train-data",
                          str(missing)), str(blocker))
    assert str(missing) not in line
    assert blocker.read_text() == "not a folder"
    assert os.listdir(tmp_path) == ["run"]


def test_a_refused_run_leaves_no_new_folders(cli, tiny_models, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_training_data"
    run_dir = tmp_path / "new" / "deep" / "run"
    error_line(cli("quantize", "--model", str(tiny_models["qat"]), "--run-dir", str(run_dir), "--train-data",
                   str(missing), *SHORT), str(missing))
    assert not (tmp_path / "new").exists()

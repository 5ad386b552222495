"""Training options are declared once (a config field made with ``option()``) and derived everywhere:
``--help`` of quantize/slim/distill (with the real default), preset and ``--config`` keys with their
types and bounds, and the precedence flag > --config > preset > default into the typed engine configs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from quantsr_cli.cli import quantize as quantize_cmd
from quantsr_cli.cli.app import app
from quantsr_cli.cli.quantize import build_job, resolve_options
from quantsr_cli.cli.trainopts import options_for
from quantsr_cli.config import ModelConfig, QuantConfig, TrainConfig, training_options
from quantsr_cli.errors import ConfigError
from quantsr_cli.presets import load_config_file, load_preset, preset_keys

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("quantize", "slim", "distill")
runner = CliRunner()


def _job(opts: Any):
    return build_job(opts, run_dir=None, out=None, resume=False, device="cpu")


def _click_params(command: str) -> dict[str, Any]:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]


# ------------------------------------------------------------------ one declaration, every derived place
def test_every_option_is_a_file_key_and_a_flag_where_declared() -> None:
    names = {d.name for d in training_options()}
    assert set(preset_keys()) == names | {"description"}
    for cls in (ModelConfig, QuantConfig, TrainConfig):
        declared = {f.name for f in fields(cls) if "option" in f.metadata}
        assert declared <= names
    assert {"betas", "eta_min", "num_workers"}.isdisjoint(names)  # plain fields are not options
    for command in COMMANDS:
        params = _click_params(command)
        for decl in options_for(command):
            assert decl.name in params, (command, decl.name)
            flag = decl.option.flag(decl.name, command)
            assert flag in params[decl.name].opts
    # per-command flag names and required flags come from the same declarations
    slim, distill = _click_params("slim"), _click_params("distill")
    assert slim["slim_to"].opts == ["--target-blocks"] and slim["slim_to"].required
    assert slim["slim_start_ratio"].opts == ["--start-ratio"]
    assert distill["distill"].opts == ["--teacher"] and distill["distill"].required
    assert "slim_start_ratio" not in _click_params("quantize")  # a file key only on quantize, as before


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = result.output
    for decl in options_for(command):
        assert "[" not in decl.option.help  # rich markup would eat it (the old "Validation benchmark ." bug)
        flag = decl.option.flag(decl.name, command)
        line = next(ln for ln in text.splitlines() if ln.startswith("│") and re.search(re.escape(flag) + r"\b", ln))
        if command in decl.option.required:
            assert "[required]" in line, line
        else:
            assert "[default: " in line, line
            if decl.option.shown:
                assert decl.option.shown in line
            elif decl.kind in (int, str) and not decl.optional:
                assert f"[default: {decl.default}]" in line, line
    assert text.count(" .") == 0


def test_real_defaults_in_quantize_help() -> None:
    text = runner.invoke(app, ["quantize", "--help"], env={"COLUMNS": "250"}).output
    for flag, default in (("--iters", "2000"), ("--batch-size", "16"), ("--patch-size", "192"), ("--lr", "0.0002"),
                          ("--method", "rbd"), ("--val-dataset", "Set5"), ("--act-sign", "min"),
                          ("--feature-weight", "0.0001"), ("--scale", "4"), ("--bits", "4")):
        line = next(ln for ln in text.splitlines() if ln.startswith("│") and re.search(re.escape(flag) + r"\s", ln))
        assert f"[default: {default}]" in line, line


# ------------------------------------------------------------------ a new option: one line, end to end
NEW_FIELD = '    warmup_iters: int = option(0, "Linear learning-rate warm-up iterations.", ge=0)\n'

DRIVE = textwrap.dedent('''
    import json, sys
    from typer.testing import CliRunner
    from quantsr_cli.cli import quantize as q
    from quantsr_cli.cli.app import app

    seen = []
    q.run_quantize = lambda job, on_event=None: seen.append(job) or {}
    args = sys.argv[1:]
    result = CliRunner().invoke(app, ["quantize", "--run-dir", "unused", *args])
    if result.exit_code != 0:
        sys.exit(f"failed: {result.exception} {result.output}")
    print(json.dumps({"value": seen[0].train.warmup_iters, "type": type(seen[0].train).__name__}))
''')


def test_a_new_option_declared_in_one_place_reaches_help_files_and_the_engine(tmp_path: Path) -> None:
    """Copy the package, add ONE field line to TrainConfig, and use the option everywhere."""
    shutil.copytree(REPO / "quantsr_cli", tmp_path / "quantsr_cli",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    config_py = tmp_path / "quantsr_cli" / "config.py"
    source = config_py.read_text()
    anchor = "    drop_path_rate: float = option("
    assert source.count(anchor) == 1
    config_py.write_text(source.replace(anchor, NEW_FIELD + anchor))
    (tmp_path / "presets" / "tiny_warmup.yaml").write_text("arch: imdn\nbits: 4\nwarmup_iters: 5\n")
    (tmp_path / "opts.yaml").write_text("arch: imdn\nbits: 4\nwarmup-iters: 6\n")
    (tmp_path / "bad.yaml").write_text("arch: imdn\nwarmup_iters: -1\n")
    (tmp_path / "drive.py").write_text(DRIVE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    where = run("-c", "import quantsr_cli; print(quantsr_cli.__file__)")
    assert where.stdout.strip() == str(tmp_path / "quantsr_cli" / "__init__.py")
    helped = run("-m", "quantsr_cli", "quantize", "--help")
    line = next(ln for ln in helped.stdout.splitlines() if "--warmup-iters" in ln)
    assert "Linear learning-rate warm-up iterations." in line and "[default: 0]" in line
    for args, expected in ((["--preset", "tiny_warmup"], 5), (["--config", "opts.yaml"], 6),
                           (["--config", "opts.yaml", "--warmup-iters", "9"], 9), (["--arch", "imdn"], 0)):
        out = run("drive.py", *args)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == f'{{"value": {expected}, "type": "TrainConfig"}}'
    bad = run("drive.py", "--config", "bad.yaml")
    assert bad.returncode != 0 and "warmup_iters=-1 must not be negative" in bad.stderr + bad.stdout


# ------------------------------------------------------------------ precedence with real options
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_flag_over_config_over_preset_over_default(tmp_path: Path) -> None:
    preset = load_preset("imdn_x4_w2a2")  # iters 4000, patch 128, act_sign mse, save_every 50
    assert preset["iters"] == 4000 and preset["patch_size"] == 128 and preset["act_sign"] == "mse"
    config = _write(tmp_path / "c.yaml", "iters: 50\npatch_size: 64\nlr: 1.0e-3\n")
    opts, used = resolve_options({"iters": 7}, config, "imdn_x4_w2a2")
    job = _job(opts)
    assert used == "imdn_x4_w2a2"
    assert job.train.iters == 7 and opts.source("iters") == "flag"
    assert job.train.patch_size == 64 and job.train.lr == 1e-3 and opts.source("patch_size") == f"--config {config}"
    assert job.quant.act_sign == "mse" and job.train.save_every == 50
    assert opts.source("act_sign") == "preset imdn_x4_w2a2"
    assert job.train.ema_decay == TrainConfig().ema_decay and opts.source("ema_decay") == "default"
    assert job.arch == "imdn" and job.quant.w_bits == job.quant.a_bits == 2
    table = {name: (value, source) for name, value, source in opts.table()}
    assert table["iters"] == (7, "flag") and table["gamma"] == (0.5, "default")


def test_bits_alias_follows_the_same_precedence(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "arch: quantsr-c\nw_bits: 2\na_bits: 2\n")
    assert _job(resolve_options({"bits": 4}, config, None)[0]).quant.w_bits == 4  # flag beats the file
    assert _job(resolve_options({"bits": 4, "w_bits": 8}, config, None)[0]).quant.w_bits == 8
    assert _job(resolve_options({}, config, None)[0]).quant.a_bits == 2
    assert _job(resolve_options({"arch": "imdn", "bits": 32}, None, None)[0]).quant.full_precision


def test_cli_flags_left_at_their_default_do_not_override_files(tmp_path: Path, monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(quantize_cmd, "run_quantize", lambda job, on_event=None: seen.append(job) or {})
    config = _write(tmp_path / "c.yaml", "arch: quantsr-c\nscale: 2\nbits: 4\nlr: 1.0e-3\n"
                    "slim_start_ratio: 0.5\nfeature_weight: 0.01\nval_dataset: Set14\n")
    base = ["--config", str(config), "--run-dir", str(tmp_path / "r")]
    for argv in (["quantize", *base, "--iters", "3"],
                 ["slim", *base, "--arch", "quantsr-c", "--target-blocks", "2", "--iters", "3"],
                 ["quantize", *base, "--iters", "3", "--lr", "2e-4", "--val-dataset", "Set5"]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    plain, slim, flagged = seen
    assert plain.train.lr == 1e-3 and plain.train.val_dataset == "Set14" and plain.train.iters == 3
    assert plain.scale == 2 and plain.quant.w_bits == 4
    assert slim.train.slim_start_ratio == 0.5 and slim.train.slim_to == 2  # --start-ratio not given: file wins
    assert flagged.train.lr == 2e-4 and flagged.train.val_dataset == "Set5"  # given flags win
    assert all(type(job.train) is TrainConfig for job in seen)


@pytest.mark.parametrize(("text", "words"), [
    ("iters: -1\n", "iters=-1 must not be negative"),
    ("layers: {conv_first: 3}\n", "key 'layers': layers: 'conv_first': '3' is not fp, 2, 4, 8"),
    ("ema_decay: 1.5\n", "ema_decay=1.5 must be in [0, 1)"),
    ("drop-path-rate: -0.1\n", "drop_path_rate=-0.1 must be in [0, 1)"),
    ("scheduler: linear\n", "scheduler='linear' is not supported; choose cosine, multistep or constant"),
    ("bits: 3\n", "bits=3 is not supported; choose 2, 4 or 8 (32 = full precision)"),
    ("w_bits: 3\n", "w_bits=3 is not supported; choose 2, 4 or 8 (32 = full precision)"),
    ("scale: 8\n", "scale=8 is not supported; choose 2, 3 or 4"),
    ("lr: .inf\n", "key 'lr' must be a finite number"),
    ("gamma: .nan\n", "key 'gamma' must be a finite number"),
    ("train_data: data\n", "key 'train_data' must be of type list"),
    ("betas: [0.9, 0.999]\n", "unknown key 'betas'"),
])
def test_config_files_are_checked_against_the_declarations(tmp_path: Path, text: str, words: str) -> None:
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_config_file_values_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "lr: 1\nmilestones: [10, 20]\ntrain-data: [a, b]\ngamma: 2e-1\n")
    assert load_config_file(path) == {"lr": 1.0, "milestones": (10, 20), "train_data": ("a", "b"), "gamma": 0.2}
    job = _job(resolve_options({"arch": "imdn"}, path, None)[0])
    assert job.train.milestones == (10, 20) and isinstance(job.train.lr, float)

"""What a newcomer reads in the terminal: every option's default in ``--help``, examples at the end of
each command's help, ``--version``, ``quantsr presets`` and the resolved-config print of training commands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from quantsr_cli import __version__
from quantsr_cli.cli.app import app
from quantsr_cli.config import training_options
from quantsr_cli.presets import list_presets, load_preset

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


def _commands(group: object | None = None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """``(path, click command)`` of every leaf command of the app (diffusion and data subcommands included)."""
    group = group or typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):  # type: ignore[attr-defined]
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = list(_commands())
IDS = [" ".join(p) for p, _ in COMMANDS]


def _rows(text: str) -> list[str]:
    """The rows of the option/argument panels, each with its wrapped continuation lines joined."""
    rows: list[str] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        if re.match(r"│\s+(\*\s+)?(-{1,2}\w|\w+\.\.\.|\w+\s+<)", line) or not rows:
            rows.append(line)
        else:
            rows[-1] += " " + line.strip("│ ")
    return rows


def test_every_command_is_covered() -> None:
    names = {p[-1] for p, _ in COMMANDS}
    assert {"upscale", "eval", "quantize", "slim", "distill", "pack", "info", "presets", "check", "train",
            "sweep"} <= names


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_option_shows_its_default_or_that_it_is_required(path: tuple[str, ...], command: object) -> None:
    result = runner.invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    for param in command.params:  # type: ignore[attr-defined]
        if param.name == "help":
            continue
        if param.param_type_name == "option":
            flag = next(o for o in param.opts if o.startswith("--"))
            pattern = r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])"
        else:
            pattern = r"│\s+(\*\s+)?" + re.escape(param.name)
        row = next((r for r in rows if re.search(pattern, r.split("  <")[0] + " ")), None)
        assert row is not None, (path, param.name, result.output)
        assert "[default: " in row or "[required]" in row, (path, param.name, row)
    assert not re.search(r" \.(\s|│|$)", result.output)  # rich markup ate no "[default: ...]" written into a help string


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_every_command_help_ends_with_examples(path: tuple[str, ...], command: object) -> None:
    epilog = command.epilog or ""  # type: ignore[attr-defined]
    assert epilog.startswith("Examples:") and "[" not in epilog, path
    lines = [ln.strip() for ln in epilog.splitlines()[1:]]
    assert 1 <= len(lines) <= 2 and all(ln.startswith(f"quantsr {' '.join(path)}") for ln in lines), lines
    text = runner.invoke(app, [*path, "--help"], env=WIDE).output
    out = [ln.strip() for ln in text.strip().splitlines()]
    assert out[-len(lines) - 1:] == ["Examples:", *lines]  # the last lines of the help


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"quantsr {__version__} (torch ")
    assert len(result.output.strip().splitlines()) == 1


def test_presets_lists_every_bundled_preset_with_its_description() -> None:
    result = runner.invoke(app, ["presets", "--json"])
    assert result.exit_code == 0
    listed = json.loads(result.output)
    assert [p["name"] for p in listed] == list_presets()
    assert all(p["description"].strip() for p in listed)  # every bundled preset declares one
    text = runner.invoke(app, ["presets"], env=WIDE).output
    for name in list_presets():
        assert re.search(rf"^{re.escape(name)}\s+\S", text, re.M), name


def test_presets_name_shows_its_options() -> None:
    result = runner.invoke(app, ["presets", "imdn_x4_w4a4", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["arch"] == "imdn"
    unknown = runner.invoke(app, ["presets", "nope"])
    assert unknown.exit_code == 1 or "unknown preset" in str(unknown.exception)


@pytest.mark.parametrize("command", ["quantize", "slim", "distill"])
def test_print_config_shows_each_value_and_where_it_came_from(command: str, tmp_path, monkeypatch) -> None:
    from quantsr_cli.cli import quantize as quantize_cmd

    monkeypatch.setattr(quantize_cmd, "run_quantize", lambda *a, **k: pytest.fail("--print-config trained"))
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("batch_size: 3\nlr: 1.0e-3\n")
    args = {"quantize": ["quantize", "--arch", "imdn", "--bits", "2"],
            "slim": ["slim", "--arch", "quantsr-c", "--bits", "2", "--target-blocks", "8"],
            "distill": ["distill", "--model", "default-w2", "--teacher", "teacher.pth"]}[command]
    result = runner.invoke(app, [*args, "--config", str(cfg), "--lr", "5e-4", "--print-config", "--json",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    options = report["options"]
    assert options["lr"] == {"value": 5e-4, "source": "flag"}
    assert options["batch_size"] == {"value": 3, "source": f"--config {cfg}"}
    assert options["iters"]["source"] == f"preset {report['preset']}"  # every bundled preset sets iters
    assert options["ema_decay"] == {"value": 0.0, "source": "default"}
    assert options["w_bits"]["value"] == 2
    assert set(options) == {d.name for d in training_options() if not d.sets}
    assert not (tmp_path / "run").exists()
    if command == "distill":
        assert options["arch"]["source"] == "--model default-w2"


def test_print_config_text_lists_every_option_on_one_line_each() -> None:
    result = runner.invoke(app, ["quantize", "--preset", "imdn_x4_w4a4", "--iters", "7", "--print-config"],
                           env=WIDE)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("quantize: preset imdn_x4_w4a4, run directory ")
    assert re.search(r"^\s+iters\s+7\s+flag$", result.output, re.M)
    assert re.search(r"^\s+lr\s+0.0002\s+preset imdn_x4_w4a4$", result.output, re.M)
    assert len(lines) == 1 + len([d for d in training_options() if not d.sets])


def test_preset_descriptions_are_one_line() -> None:
    for name in list_presets():
        assert "\n" not in load_preset(name)["description"], name

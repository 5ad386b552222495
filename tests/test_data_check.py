"""``quantsr data check``: one line per dataset (present / missing / malformed), exit 1 when a requested
dataset is not usable, and a default data folder that does not depend on the current directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from quantsr_cli.data.catalog import KNOWN, check_data_root
from quantsr_cli.data.io import write_image

runner = CliRunner()


def _images(folder: Path, count: int, size: tuple[int, int] = (16, 12), prefix: str = "im") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(count)
    for i in range(count):
        write_image(folder / f"{prefix}{i}.png", torch.rand(1, 3, size[1], size[0], generator=g))


@pytest.fixture()
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _images(root / "benchmarks" / "Set5" / "HR", 5)
    _images(root / "benchmarks" / "Set5" / "LR_bicubic" / "X4", 5, size=(4, 3))
    for f in (root / "benchmarks" / "Set5" / "LR_bicubic" / "X4").iterdir():
        f.rename(f.with_name(f.stem + "x4.png"))
    _images(root / "benchmarks" / "Set14" / "HR", 3)  # incomplete: 3 of 14
    _images(root / "train" / "T91", 91, size=(8, 8))
    _images(root / "train" / "DIV2K_train_HR", 4)  # the name DIV2K's zip extracts to; a partial set
    _images(root / "train" / "Flickr2K" / "Flickr2K_HR", 2)  # the tar's nesting: images one level down
    (root / "train" / "BSD200").mkdir(parents=True)
    (root / "train" / "BSD200" / "bad.png").write_bytes(b"not a png")
    _images(root / "train" / "my_photos", 2)
    return root


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def test_one_line_per_known_dataset_with_status(data_root: Path) -> None:
    rows = _by_name([r.to_dict() for r in check_data_root(data_root)])
    assert [d.name for d in KNOWN] == list(rows)[: len(KNOWN)]
    assert rows["Set5"]["status"] == "ok" and "LR x4" in rows["Set5"]["detail"]
    assert rows["Set14"]["status"] == "malformed" and "3 HR images" in rows["Set14"]["detail"]
    for name in ("B100", "Urban100", "Manga109"):
        assert rows[name]["status"] == "missing"
    assert rows["T91"]["status"] == "ok" and rows["T91"]["images"] == 91
    assert rows["DIV2K"]["status"] == "ok" and "standard set has 800" in rows["DIV2K"]["detail"]
    assert rows["Flickr2K"]["status"] == "malformed" and "Flickr2K_HR/" in rows["Flickr2K"]["detail"]
    assert rows["BSD200"]["status"] == "malformed" and "not readable" in rows["BSD200"]["detail"]
    assert rows["my_photos"]["kind"] == "other" and rows["my_photos"]["status"] == "ok"
    assert rows["IMDN weights"]["status"] == "missing"


def test_lr_files_that_do_not_match_are_malformed(data_root: Path) -> None:
    (data_root / "benchmarks" / "Set5" / "LR_bicubic" / "X4" / "im0x4.png").unlink()
    row = check_data_root(data_root, ["set5"])[0]
    assert row.status == "malformed" and "LR x4" in row.detail and "count mismatch" in row.detail


def test_cli_text_json_and_exit_codes(data_root: Path) -> None:
    text = runner.invoke(app, ["data", "check", str(data_root)])
    assert text.exit_code == 1  # something present is malformed
    lines = text.stdout.splitlines()
    assert lines[0] == f"data folder: {data_root} (given)"
    assert any(ln.split()[:2] == ["Set5", "ok"] for ln in lines)
    assert any(ln.split()[:2] == ["B100", "missing"] for ln in lines)

    ok = runner.invoke(app, ["data", "check", str(data_root), "-d", "Set5", "-d", "T91", "--json"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["root"] == str(data_root) and [r["status"] for r in report["datasets"]] == ["ok", "ok"]

    missing = runner.invoke(app, ["data", "check", str(data_root), "-d", "Set5", "-d", "B100"])
    assert missing.exit_code == 1
    assert missing.stdout.splitlines()[2].split()[:2] == ["B100", "missing"]
    assert "B100 (missing)" in str(missing.exception)

    unknown = runner.invoke(app, ["data", "check", str(data_root), "-d", "Set6"])
    assert unknown.exit_code == 1 and "unknown dataset 'Set6'" in str(unknown.exception)


def test_cli_missing_folder_is_an_error_after_the_report(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(tmp_path / "none"), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["exists"] is False
    assert "data folder not found" in str(result.exception)


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG data folder on Linux")
def test_default_data_folder_is_per_user_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     data_root: Path) -> None:
    monkeypatch.delenv("QUANTSR_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(data_root / "train")  # ../benchmarks exists here: it must not matter
    result = runner.invoke(app, ["data", "check", "--json"])
    assert json.loads(result.stdout)["root"] == str(tmp_path / "xdg" / "quantsr")
    monkeypatch.setenv("QUANTSR_DATA", str(data_root))
    result = runner.invoke(app, ["data", "check", "-d", "Set5", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["origin"] == "$QUANTSR_DATA"

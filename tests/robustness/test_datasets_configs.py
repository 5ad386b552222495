"""Bad datasets and config files: missing folders, HR/LR mismatches, YAML with unknown keys, wrong
types or Python tags. YAML is only ever read with ``safe_load``: a tag that would run code is an error
and its payload never runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .helpers import error_line, fresh_dir, read_any, write_png

RNG = np.random.default_rng(3)


def _img(h: int, w: int) -> np.ndarray:
    return (RNG.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    for i in range(3):
        write_png(root / "count" / "HR" / f"im{i}.png", _img(16, 16))
        write_png(root / "size" / "HR" / f"im{i}.png", _img(16, 16))
        write_png(root / "size" / "LR_bicubic" / "X2" / f"im{i}x2.png", _img(7, 8))  # HR/2 would be 8x8
        write_png(root / "names" / "HR" / f"im{i}.png", _img(16, 16))
        write_png(root / "names" / "LR_bicubic" / "X2" / f"other{i}x2.png", _img(8, 8))
        write_png(root / "unreadable" / "HR" / f"im{i}.png", _img(16, 16))
    for i in range(2):
        write_png(root / "count" / "LR_bicubic" / "X2" / f"im{i}x2.png", _img(8, 8))
    (root / "unreadable" / "HR" / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "empty" / "HR").mkdir(parents=True)
    return root


# dataset folder -> words of the error line (the offending path is checked too)
DATASET_CASES = {
    "missing": ("missing", "dataset folder not found"),
    "count": ("count/LR_bicubic/X2", "HR/LR count mismatch: 3 HR vs 2 LR"),
    "size": ("size/LR_bicubic/X2/im0x2.png", "LR size 8x7 is not floor(HR 16x16 / 2)"),
    "names": ("names/LR_bicubic/X2", "no LR image"),
    "unreadable": ("unreadable/HR/im1.png", "unreadable image"),
    "empty": ("empty/HR", "no HR images"),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_benchmark_dataset(cli, tiny_models, datasets: Path, tmp_path: Path, case: str) -> None:
    where, words = DATASET_CASES[case]
    result = cli("eval", "--model", str(tiny_models["packed"]), "--dataset", str(datasets / case),
                 "--save-dir", str(tmp_path / "sr"), cwd=tmp_path, env={"QUANTSR_CACHE": str(tmp_path / "cache")})
    error_line(result, str(datasets / where), words)
    if case == "unreadable":  # images before the broken one were evaluated: their SR files are complete
        saved = sorted((tmp_path / "sr").rglob("*"))
        assert [p.name for p in saved if p.is_file()] == ["im0.png"]
        assert read_any(saved[-1]).shape == (16, 16, 3)  # HR-only set: LR 8x8 made by bicubic, SR x2
    else:  # refused before any image was evaluated
        assert not (tmp_path / "sr").exists()


def test_unknown_dataset_name(cli, tiny_models, tmp_path: Path) -> None:
    result = cli("eval", "--model", str(tiny_models["packed"]), "--dataset", "Set99", "--data-root", str(tmp_path))
    error_line(result, "Set99", "not found")


def test_bad_training_data(cli, tmp_path: Path) -> None:
    common = ["quantize", "--arch", "quantsr-c", "--bits", "2", "--iters", "1", "--batch-size", "1",
              "--patch-size", "32", "--run-dir", str(tmp_path / "run")]
    missing = tmp_path / "no_such_folder"
    error_line(cli(*common, "--train-data", str(missing), cwd=tmp_path), str(missing), "training folder not found")
    empty = fresh_dir(tmp_path / "empty_train")
    error_line(cli(*common, "--train-data", str(empty), cwd=tmp_path), str(empty), "no images")
    small = fresh_dir(tmp_path / "small_train")
    write_png(small / "tiny.png", _img(8, 8))
    error_line(cli(*common, "--train-data", str(small), cwd=tmp_path), "smaller than patch_size=32")
    broken = fresh_dir(tmp_path / "broken_train")
    (broken / "bad.png").write_bytes(b"")
    error_line(cli(*common, "--train-data", str(broken), cwd=tmp_path), str(broken / "bad.png"), "empty file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def _billion_laughs() -> str:
    body = "arch: [&a0 [x, x, x, x, x, x, x, x, x, x]"
    for i in range(1, 10):
        body += f", &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]"
    return body + "]\n"


# file content -> words of the error line
CONFIG_CASES = {
    "unknown_key": ("arch: quantsr-c\nbits: 2\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    "wrong_type": ("arch: quantsr-c\niters: many\n", "key 'iters' must be of type int"),
    "wrong_type_bool": ("arch: quantsr-c\nbits: true\n", "key 'bits' must be of type int"),
    "wrong_list_item": ("arch: quantsr-c\nmilestones: [100, soon]\n", "key 'milestones' must be a list of int"),
    "not_finite": ("arch: quantsr-c\nlr: .nan\n", "key 'lr' must be a finite number"),
    "python_object": ("arch: !!python/object/apply:os.system ['touch {marker}']\n", "could not determine a constructor"),
    "python_name": ("arch: !!python/name:os.system\n", "could not determine a constructor"),
    "python_new": ("!!python/object/new:subprocess.Popen [['touch', '{marker}']]\n", "could not determine a constructor"),
    "top_level_list": ("- arch\n- quantsr-c\n", "expected a mapping"),
    "syntax_error": ("arch: [quantsr-c\n", "invalid YAML"),
    "not_utf8": (b"arch: quantsr-c\n# caf\xe9\n", "not UTF-8"),
    "billion_laughs": (_billion_laughs(), "key 'arch' must be of type str"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_file(cli, tmp_path: Path, case: str) -> None:
    content, words = CONFIG_CASES[case]
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / f"{case}.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("{marker}", str(marker)))
    result = cli("quantize", "--config", str(path), "--iters", "1", "--run-dir", str(tmp_path / "run"), cwd=tmp_path,
                 timeout=120)
    line = error_line(result, str(path), words)
    assert len(line) < 600
    assert not marker.exists(), "a YAML tag ran code"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_missing_config_file_and_unknown_preset(cli, tmp_path: Path) -> None:
    error_line(cli("quantize", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path), "nope.yaml", "cannot read")
    error_line(cli("quantize", "--preset", "no_such_preset", "--arch", "quantsr-c", cwd=tmp_path),
               "unknown preset 'no_such_preset'")
    assert list(tmp_path.iterdir()) == []

"""Bad model files: truncated, tampered, newer format, other arch/scale, code-executing pickles, empty.

Each is refused through the real CLI with one line naming the file and the problem; a ``.pth`` whose
pickle would run code is refused by ``weights_only`` loading and the payload provably never runs.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

from quantsr_cli.errors import CheckpointError
from quantsr_cli.models.loading import read_state_dict
from quantsr_cli.packing import io as packing_io

from .helpers import error_line, fresh_dir, write_png


def _rewrite_metadata(src: Path, dst: Path, **changes: str) -> Path:
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(changes)
    blob = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    return dst


def _tampered(src: Path, dst: Path, how: str) -> Path:
    """A well-formed file (valid checksum) whose tensors do not fit the model its metadata describes."""
    tensors, meta = packing_io.read_file(src)
    if how == "missing":
        del tensors["conv_last.weight"]
    elif how == "extra":
        tensors["body.7.conv1.qweight"] = torch.zeros(4, dtype=torch.uint8)
    elif how == "shape":
        tensors["conv_first.weight"] = torch.zeros(16, 3, 3, 2)
    packing_io.save_file(tensors, meta, dst)
    return dst


def _safetensors_cases(packed: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    raw = packed.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cases = {
        "truncated_data": (raw[: len(raw) // 2], "truncated"),
        "truncated_header": (raw[: 8 + n // 2], "truncated"),
        "empty": (b"", "empty"),
        "random_bytes": (os.urandom(300), "not a safetensors file"),
    }
    out = {}
    for name, (blob, words) in cases.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(blob)
        out[name] = (path, words)
    out["missing_tensor"] = (_tampered(packed, folder / "missing.safetensors", "missing"), "missing tensors conv_last.weight")
    out["extra_tensor"] = (_tampered(packed, folder / "extra.safetensors", "extra"), "unexpected tensors body.7")
    out["wrong_shape"] = (_tampered(packed, folder / "shape.safetensors", "shape"), "conv_first.weight")
    out["newer_version"] = (_rewrite_metadata(packed, folder / "newer.safetensors", format_version="2"),
                            "newer quantsr")
    foreign = folder / "plain.safetensors"  # a valid safetensors file, but not one of ours
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    out["not_quantsr"] = (foreign, "cannot recognise the architecture")  # foreign weights: keys unknown
    out["folder"] = (fresh_dir(folder / "dir.safetensors"), "folder")
    return out


TRAIN_ARGS = ("--batch-size", "1", "--patch-size", "32", "--val-every", "0", "--threads", "1")
"""Small training options, so a command that wrongly started training would still end quickly."""

CASES = ["truncated_data", "truncated_header", "empty", "random_bytes", "missing_tensor", "extra_tensor",
         "wrong_shape", "newer_version", "not_quantsr", "folder"]


@pytest.fixture(scope="module")
def bad_files(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _safetensors_cases(tiny_models["packed"], tmp_path_factory.mktemp("bad_models"))


@pytest.mark.parametrize("case", CASES)
def test_bad_safetensors_refused_by_upscale(cli, bad_files, tmp_path: Path, case: str) -> None:
    path, words = bad_files[case]
    src = write_png(tmp_path / "in.png", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
    out = fresh_dir(tmp_path / "out")
    error_line(cli("upscale", str(src), "-o", str(out / "r.png"), "--model", str(path)), str(path), words)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "info", "pack", "slim", "distill", "quantize"])
def test_bad_safetensors_refused_by_every_command(cli, bad_files, tiny_models, small_train_dir, tmp_path: Path,
                                                 command: str) -> None:
    path, words = bad_files["truncated_header"]
    args = {
        "eval": ["eval", "--model", str(path), "--dataset", str(tmp_path)],
        "info": ["info", str(path)],
        "pack": ["pack", str(path), "-o", str(tmp_path / "p.safetensors")],
        "slim": ["slim", "--model", str(path), "--target-blocks", "1", "--run-dir", str(tmp_path / "run")],
        "quantize": ["quantize", "--model", str(path), "--run-dir", str(tmp_path / "run")],
        "distill": ["distill", "--model", str(tiny_models["student"]), "--teacher", str(path), "--iters", "1",
                    *TRAIN_ARGS, "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run")],
    }[command]
    error_line(cli(*args, cwd=tmp_path), str(path), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no packed file


def test_model_of_another_arch_or_scale(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    fp_x4, pth_x3 = str(tiny_models["fp_x4"]), str(tiny_models["pth_x3"])
    error_line(cli("eval", "--model", fp_x4, "--scale", "2", "--dataset", str(tmp_path)), fp_x4, "x4, not x2")
    error_line(cli("eval", "--model", fp_x4, "--arch", "imdn", "--dataset", str(tmp_path)), fp_x4, "quantsr-c")
    error_line(cli("eval", "--weights", pth_x3, "--scale", "4", "--dataset", str(tmp_path)), pth_x3, "x3, not x4")
    error_line(cli("eval", "--weights", pth_x3, "--arch", "imdn", "--dataset", str(tmp_path)), pth_x3, "imdn")
    # an x4 teacher for an x2 student, and a .pth of another scale as --init
    distill = cli("distill", "--model", str(tiny_models["student"]), "--teacher", fp_x4, "--iters", "1", *TRAIN_ARGS,
                  "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    error_line(distill, fp_x4)
    init = cli("quantize", "--arch", "quantsr-c", "--scale", "4", "--bits", "2", "--blocks", "1", "--init", pth_x3,
               "--iters", "1", *TRAIN_ARGS, "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run"),
               cwd=tmp_path)
    error_line(init, pth_x3, "x3")
    assert list(tmp_path.iterdir()) == []


def test_init_of_another_scale_with_more_blocks(cli, tiny_models, small_train_dir, tmp_path: Path) -> None:
    pth_x3 = str(tiny_models["pth_x3"])  # 1 block, x3; the x4 preset asks for more blocks
    init = cli("quantize", "--arch", "quantsr-c", "--scale", "4", "--bits", "2", "--init", pth_x3, "--iters", "1",
               *TRAIN_ARGS, "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    error_line(init, pth_x3)


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: proof of code execution if the marker appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def evil_files(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    marker = tmp_path / "PAYLOAD_RAN"
    folder = fresh_dir(tmp_path / "evil")
    files = {"zip_open": folder / "zip_open.pth", "zip_system": folder / "zip_system.pth",
             "legacy": folder / "legacy.pth", "nested": folder / "nested.pt"}
    weights = {"conv_first.weight": torch.zeros(16, 3, 3, 3)}
    torch.save({"params": weights, "x": _Payload(marker)}, files["zip_open"])
    torch.save({"state_dict": _SystemPayload(marker)}, files["zip_system"])
    with files["legacy"].open("wb") as fh:  # the pre-zip pickle format
        pickle.dump({"params": _Payload(marker)}, fh, protocol=2)
    torch.save({"params": {"a": [torch.zeros(1), {"b": _Payload(marker)}]}}, files["nested"])
    assert not marker.exists()
    return files, marker


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_executing_pickle_is_refused_in_process(evil_files) -> None:
    files, marker = evil_files
    for path in files.values():
        with pytest.raises(CheckpointError, match=str(path)) as err:
            read_state_dict(path)
        assert "\n" not in str(err.value) and "weights_only` set to `False`" not in str(err.value)
    assert not marker.exists(), "the pickle payload ran"


def test_code_executing_pickle_is_refused_by_every_command(cli, evil_files, tiny_models, small_train_dir,
                                                           tmp_path: Path) -> None:
    files, marker = evil_files
    src = write_png(tmp_path / "in.png", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
    zip_open, zip_system = str(files["zip_open"]), str(files["zip_system"])
    runs = [
        (cli("upscale", str(src), "-o", str(tmp_path / "o.png"), "--model", zip_system), zip_system, "posix.system"),
        (cli("eval", "--weights", zip_open, "--dataset", str(tmp_path)), zip_open, "refused to unpickle"),
        (cli("eval", "--arch", "quantsr-c", "--weights", str(files["legacy"]), "--dataset", str(tmp_path)),
         str(files["legacy"]), "weights_only"),
        (cli("info", str(files["nested"])), str(files["nested"]), "refused to unpickle"),
        (cli("quantize", "--arch", "quantsr-c", "--bits", "2", "--init", zip_open, "--iters", "1", *TRAIN_ARGS,
             "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run"), cwd=tmp_path),
         zip_open, "refused to unpickle"),
        (cli("distill", "--model", str(tiny_models["student"]), "--teacher", zip_system, "--iters", "1", *TRAIN_ARGS,
             "--train-data", str(small_train_dir), "--run-dir", str(tmp_path / "run"), cwd=tmp_path),
         zip_system, "refused"),
    ]
    for result, path, words in runs:
        error_line(result, path, words)
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "run").exists()


def test_empty_files(cli, tmp_path: Path) -> None:
    src = write_png(tmp_path / "in.png", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
    for name in ("empty.safetensors", "empty.pth", "empty.pt"):
        path = tmp_path / name
        path.write_bytes(b"")
        error_line(cli("upscale", str(src), "-o", str(tmp_path / "o.png"), "--model", str(path)), str(path), "empty")
    error_line(cli("eval", "--weights", str(tmp_path / "empty.pth"), "--dataset", str(tmp_path)), "empty.pth", "empty")
    assert not (tmp_path / "o.png").exists()


def test_debug_env_adds_the_traceback(cli, bad_files, tmp_path: Path) -> None:
    path, words = bad_files["truncated_data"]
    plain = cli("info", str(path))
    error_line(plain, str(path), words)
    debug = cli("info", str(path), env={"QUANTSR_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr

"""Out-of-range numbers on the command line: exit 1 (our check) or 2 (Typer's usage error), one clear
message naming the option, no traceback, and no run folder or output left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from .helpers import error_line, usage_error, write_png

TRAIN = ("--batch-size", "1", "--patch-size", "32", "--val-every", "0", "--threads", "1")

# (command line, exit code, words the message must contain)
CASES = {
    "quantize --bits 3": (["quantize", "--arch", "quantsr-c", "--bits", "3"], 1, ["w_bits=3", "choose 2, 4 or 8"]),
    "quantize --w-bits 5": (["quantize", "--arch", "quantsr-c", "--w-bits", "5"], 1, ["w_bits=5"]),
    "quantize --scale 5": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--scale", "5"], 1, ["--scale 5"]),
    "quantize --iters 0": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--iters", "0"], 1, ["iters=0"]),
    "quantize --iters -5": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--iters", "-5"], 1, ["iters=-5"]),
    "quantize --save-every 0": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--save-every", "0"], 1,
                                ["save_every=0"]),
    "quantize --val-every -1": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--val-every", "-1"], 1,
                                ["val_every=-1"]),
    "quantize --batch-size 0": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--batch-size", "0"], 1,
                                ["batch_size=0"]),
    "quantize --lr -1": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--lr", "-1"], 1, ["lr=-1"]),
    "quantize --blocks 0": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--blocks", "0", *TRAIN], 1,
                            ["--blocks 0"]),
    "quantize --patch-size 30": (["quantize", "--arch", "quantsr-c", "--bits", "2", "--iters", "1", "--batch-size",
                                  "1", "--patch-size", "30"], 1, ["patch_size=30", "multiple of scale=4"]),
    "quantize --bits two": (["quantize", "--arch", "quantsr-c", "--bits", "two"], 2, ["--bits"]),
    "quantize --arch unknown": (["quantize", "--arch", "resnet50", "--bits", "2", *TRAIN], 1, ["unknown arch"]),
    "slim --iters 0": (["slim", "--arch", "quantsr-c", "--bits", "2", "--target-blocks", "8", "--iters", "0"], 1,
                       ["iters=0"]),
    "slim --target-blocks 0": (["slim", "--arch", "quantsr-c", "--bits", "2", "--target-blocks", "0"], 1,
                               ["--target-blocks 0"]),
    "slim --bits 3": (["slim", "--arch", "quantsr-c", "--bits", "3", "--target-blocks", "8"], 1, ["w_bits=3"]),
    "eval --scale 5": (["eval", "--model", "{packed}", "--scale", "5"], 2, ["--scale"]),
    "eval --tile -1": (["eval", "--model", "{packed}", "--tile", "-1"], 2, ["--tile"]),
    "info --scale 5": (["info", "--arch", "quantsr-c", "--scale", "5"], 2, ["--scale"]),
    "info --bits 3": (["info", "--arch", "quantsr-c", "--bits", "3"], 1, ["w_bits=3"]),
    "upscale --tile -1": (["upscale", "{image}", "-o", "{out}", "--model", "{packed}", "--tile", "-1"], 1,
                          ["--tile -1"]),
    "upscale --tile-pad -2": (["upscale", "{image}", "-o", "{out}", "--model", "{packed}", "--tile-pad", "-2"], 1,
                              ["--tile-pad -2"]),
    "upscale --max-pixels -1": (["upscale", "{image}", "-o", "{out}", "--model", "{packed}", "--max-pixels", "-1"], 1,
                                ["--max-pixels -1"]),
    "upscale --ext gif": (["upscale", "{image}", "-o", "{out}", "--model", "{packed}", "--ext", "gif"], 1, ["--ext"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_number_is_refused(cli, tiny_models, tmp_path: Path, case: str) -> None:
    args, code, words = CASES[case]
    image = write_png(tmp_path / "in.png", np.zeros((8, 8, 3), np.uint8))
    fill = {"packed": str(tiny_models["packed"]), "image": str(image), "out": str(tmp_path / "out.png")}
    argv = [a.format(**fill) for a in args]
    if argv[0] in ("quantize", "slim"):
        argv += ["--run-dir", str(tmp_path / "run")]
    result = cli(*argv, cwd=tmp_path, timeout=120)
    if code == 2:
        usage_error(result, *words)
    else:
        error_line(result, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no run folder, no output


def test_distill_iters_zero(cli, tiny_models, tmp_path: Path) -> None:
    result = cli("distill", "--model", str(tiny_models["student"]), "--teacher", str(tiny_models["teacher"]),
                 "--iters", "0", "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    error_line(result, "iters=0")
    assert list(tmp_path.iterdir()) == []

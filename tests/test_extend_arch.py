"""Adding an architecture = this one file + one registry line (the ``monkeypatch.setitem`` below).

``toynet`` is a small plain residual conv net with its own key layout (``head``, ``stages.i.conv_a/b``,
``tail``); its :class:`ArchSpec` says how to build it, how to recognise its weights, which layers the
method quantizes and how its depth changes. Nothing else in the package is changed; it goes through
detection, ``quantsr quantize --init`` with QSA block removal (the depth rule compacts the model),
packing, loading, ``quantsr eval`` and ``quantsr info --blocks``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from typer.testing import CliRunner

from quantsr_cli.cli.app import app
from quantsr_cli.models import ARCHS, ArchSpec, SRModel, build_model, detect_arch
from quantsr_cli.models.common import check_int, check_scale, init_shortcut
from quantsr_cli.models.spec import key_indices, num_block_depth, shuffle_scale
from quantsr_cli.packing import PackedConv2d
from quantsr_cli.packing.io import load_model_file, read_metadata


# ----------------------------------------------------------------------------------------- the arch
class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(width, width, 3, 1, 1)
        self.act = nn.ReLU()
        self.conv_b = nn.Conv2d(width, width, 3, 1, 1)
        init_shortcut(self, learnable=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.skip:
            return x * self.learnable_shortcut
        return x * self.learnable_shortcut + self.conv_b(self.act(self.conv_a(x)))


class ToyNet(SRModel):
    """``head`` 3→W, ``stages.i`` residual, ``tail`` W→3s² + PixelShuffle(s), plus the bilinear input."""

    arch = "toynet"

    def __init__(self, upscale: int = 2, width: int = 8, num_blocks: int = 3) -> None:
        upscale, width = check_scale(upscale), check_int("width", width, maximum=256)
        num_blocks = check_int("num_blocks", num_blocks, maximum=64)
        super().__init__({"upscale": upscale, "width": width, "num_blocks": num_blocks})
        self.head = nn.Conv2d(3, width, 3, 1, 1)
        self.stages = nn.Sequential(*(ToyBlock(width) for _ in range(num_blocks)))
        self.tail = nn.Sequential(nn.Conv2d(width, 3 * upscale**2, 3, 1, 1), nn.PixelShuffle(upscale))

    def forward(self, x: Tensor) -> Tensor:
        base = nn.functional.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return base + self.tail(self.stages(self.head(x)))

    def block_names(self) -> list[str]:
        return [f"stages.{i}" for i in range(len(self.stages))]

    def feature_points(self) -> list[str]:
        return [f"stages.{i}.act" for i in range(len(self.stages))]


def detect(sd: Mapping[str, Tensor]) -> dict[str, Any] | None:
    if "head.weight" not in sd or "stages.0.conv_a.weight" not in sd:
        return None
    width = sd["head.weight"].shape[0]
    return {"upscale": shuffle_scale(sd["tail.0.weight"].shape[0], 3), "width": width,
            "num_blocks": len(key_indices(sd, r"stages\.(\d+)\.conv_a\.weight"))}


SPEC = ArchSpec("toynet", ToyNet, "toy residual net (test)", detect=detect,
                quant_rule=lambda model: ("stages.*.conv_a", "stages.*.conv_b"), depth=num_block_depth("num_blocks"))


# ----------------------------------------------------------------------------------------- the test
def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def test_an_arch_defined_here_is_detected_quantized_slimmed_packed_and_evaluated(
        tmp_path: Path, tiny_train_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHS, SPEC.name, SPEC)  # the one registry line
    torch.manual_seed(0)
    fp = build_model("toynet", upscale=2, width=8, num_blocks=3)
    assert fp.quant_patterns == ("stages.*.conv_a", "stages.*.conv_b")  # from the spec's rule
    assert detect_arch(fp.state_dict()) == ("toynet", fp.hparams)
    assert detect_arch(build_model("imdn", num_modules=1).state_dict())[0] == "imdn"  # others unaffected
    init = tmp_path / "toynet_x2.pth"
    torch.save({"params": fp.state_dict()}, init)

    run = tmp_path / "run"
    out = _cli("quantize", "--arch", "toynet", "--init", str(init), "--scale", "2", "--bits", "4", "--iters", "4",
               "--slim-to", "2", "--batch-size", "2", "--patch-size", "16", "--val-every", "0", "--save-every", "4",
               "--train-data", str(tiny_train_dir), "--run-dir", str(run), "--threads", "1").strip().splitlines()[-1]
    meta = read_metadata(out)
    assert (meta["kind"], meta["arch"], meta["w_bits"]) == ("packed", "toynet", "4")
    assert json.loads(meta["hparams"])["num_blocks"] == 2  # QSA removed a block; the depth rule compacted it
    packed = load_model_file(out)
    assert packed.block_names() == ["stages.0", "stages.1"]
    assert all(isinstance(packed.get_submodule(f"stages.{i}.{c}"), PackedConv2d) for i in (0, 1) for c in ("conv_a", "conv_b"))
    assert isinstance(packed.head, nn.Conv2d) and not isinstance(packed.head, PackedConv2d)  # FP, per the rule

    result = json.loads(_cli("eval", "--model", out, "--dataset", "Set5", "--json", "--backend", "torch",
                             "--data-root", str(shared_data / "benchmarks")))
    assert result["scale"] == 2 and result["datasets"]["Set5"]["psnr"] > 20.0  # ~bilinear plus a small residual

    info = json.loads(_cli("info", "--arch", "toynet", "--scale", "2", "--blocks", "5", "--bits", "4", "--json"))
    assert info["hparams"]["num_blocks"] == 5
    assert info["quantized_params"] == 5 * 2 * 8 * 8 * 9  # only the blocks' convs, per the rule

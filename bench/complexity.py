"""Params, quantized params, MACs and equivalent params/ops of the QuantSR Table 2 configurations.

Each row is ``quantsr info --arch ARCH --blocks N --bits B`` (MACs at a 3x256x256 LR input; equivalent
params/ops count the quantized part x bits/32 and the full-precision part as is, the papers' convention),
next to the paper's figures (seed 003, Table 2). For ``swinir-s`` the attention matmuls (q·kᵀ, attn·v) are
reported separately, since the paper leaves them out. Deterministic; writes
``bench/results/complexity_x4.json`` in a few seconds::

    python bench/complexity.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from benchinfo import code_version, machine

from quantsr_cli.engine.report import INPUT_SHAPE, model_info
from quantsr_cli.metrics.complexity import count_macs
from quantsr_cli.models import build_model

HERE = Path(__file__).resolve().parent
# (arch, W/A bits, blocks, paper params (K), paper ops (G)); 32 = full precision
CONFIGS = (
    ("srresnet", 32, 16, 1367, 90.1),
    ("quantsr-c", 4, 32, 451, 29.9), ("quantsr-c", 4, 16, 303, 20.2), ("quantsr-c", 4, 8, 230, 15.4),
    ("quantsr-c", 2, 32, 170, 11.5), ("quantsr-c", 2, 16, 161, 10.9), ("quantsr-c", 2, 8, 156, 10.6),
    ("swinir-s", 32, 4, 930, 56.47),
    ("swinir-s", 4, 4, 154, 9.39), ("swinir-s", 4, 2, 98.8, 6.03), ("swinir-s", 4, 1, 71.0, 4.34),
    ("swinir-s", 2, 4, 50.2, 3.08), ("swinir-s", 2, 2, 46.8, 2.87), ("swinir-s", 2, 1, 45.1, 2.77),
)


def row(arch: str, bits: int, blocks: int, paper_params: float, paper_ops: float) -> dict[str, Any]:
    info = model_info(arch=arch, scale=4, bits=None if bits == 32 else bits, blocks=blocks)
    out = {"arch": arch, "bits": bits, "blocks": blocks, "params": info["params"],
           "quantized_params": info["quantized_params"], "macs": info["macs"],
           "equivalent_params": info["equivalent_params"], "equivalent_ops": info["equivalent_ops"],
           "params_reduction": info["params_reduction"], "ops_reduction": info["ops_reduction"],
           "paper_params_k": paper_params, "paper_ops_g": paper_ops}
    if arch == "swinir-s":
        model = build_model(arch, **info["hparams"]).eval()
        out["attention_matmul_macs"] = int(count_macs(model, INPUT_SHAPE)["matmul"])  # type: ignore[call-overload]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "complexity_x4.json")
    args = parser.parse_args()
    result = {"benchmark": "complexity_x4", "code_version": code_version(), "machine": machine(),
              "input_shape": list(INPUT_SHAPE), "rows": [row(*c) for c in CONFIGS]}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()

"""The reference numbers: the published IMDN weights and the bundled packed models, evaluated as ``quantsr eval``.

Evaluates, with BasicSR conventions (Y channel, ``scale`` pixels cropped):

* the published FP32 IMDN x4 weights (``$QUANTSR_DATA/weights/IMDN_x4.pth``) on Set5 and Set14, and IMDN x2 on Set5,
  next to the published figures;
* MATLAB-exact bicubic at x4 (Set5, Set14) and x2 (Set5);
* the bundled ``default`` (W4A4) and ``default-w2`` (W2A2) packed models on Set5 and Set14 (``torch`` backend,
  bit-identical to the fake-quant model) and on Set5 with the ``cpu`` backend; their file sizes.

Writes ``bench/results/bundled_models.json`` (with the code version and machine) in about a minute::

    python bench/bundled_models.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchinfo import code_version, machine

from quantsr_cli.backends import use_backend
from quantsr_cli.data import shared_data_dir
from quantsr_cli.engine.evaluate import evaluate_model
from quantsr_cli.engine.modelio import load_model, resolve_model_path

HERE = Path(__file__).resolve().parent
PUBLISHED = {  # IMDN paper (Hui et al. 2019), Table 2; bicubic as usually published (e.g. EDSR/RCAN tables)
    "imdn_x4": {"Set5": {"psnr": 32.21, "ssim": 0.8948}, "Set14": {"psnr": 28.58}},
    "imdn_x2": {"Set5": {"psnr": 38.00}},
    "bicubic_x4": {"Set5": {"psnr": 28.42, "ssim": 0.8104}, "Set14": {"psnr": 26.00}},
    "bicubic_x2": {"Set5": {"psnr": 33.66}},
}


def _metrics(source: str, datasets: tuple[str, ...], backend: str = "torch") -> dict[str, Any]:
    loaded = load_model(source)
    if backend != "torch":
        use_backend(loaded.model, backend)
    out: dict[str, Any] = {}
    for name in datasets:
        res = evaluate_model(loaded, name)
        out[name] = {"psnr": round(res.psnr, 4), "ssim": round(res.ssim, 4),
                     "bicubic": {"psnr": round(res.bicubic["psnr"], 4), "ssim": round(res.bicubic["ssim"], 4)}}
    return out


def measure(weights: Path) -> dict[str, Any]:
    """Every row (see the module docstring)."""
    fp4 = _metrics(str(weights / "IMDN_x4.pth"), ("Set5", "Set14"))
    fp2 = _metrics(str(weights / "IMDN_x2.pth"), ("Set5",))
    rows: dict[str, Any] = {
        "imdn_x4": {"label": "IMDN x4 (FP32, published weights)", "scale": 4, "bits": "32/32",
                    "params": sum(p.numel() for p in load_model(str(weights / "IMDN_x4.pth")).model.parameters()),
                    "file_bytes": (weights / "IMDN_x4.pth").stat().st_size,
                    **{k: {"psnr": v["psnr"], "ssim": v["ssim"]} for k, v in fp4.items()}},
        "imdn_x2": {"label": "IMDN x2 (FP32, published weights)", "scale": 2, "bits": "32/32",
                    **{k: {"psnr": v["psnr"], "ssim": v["ssim"]} for k, v in fp2.items()}},
        "bicubic_x4": {"label": "bicubic x4 (MATLAB-exact imresize)", "scale": 4,
                       **{k: v["bicubic"] for k, v in fp4.items()}},
        "bicubic_x2": {"label": "bicubic x2 (MATLAB-exact imresize)", "scale": 2,
                       **{k: v["bicubic"] for k, v in fp2.items()}},
    }
    for name, label, bits in (("default", "default (IMDN x4, RBD W4A4, packed)", "4/4"),
                              ("default-w2", "default-w2 (IMDN x4, RBD W2A2, packed)", "2/2")):
        torch_metrics = _metrics(name, ("Set5", "Set14"))
        cpu_metrics = _metrics(name, ("Set5",), backend="cpu")
        rows[name] = {"label": label, "scale": 4, "bits": bits,
                      "file_bytes": resolve_model_path(name).stat().st_size,
                      **{k: {"psnr": v["psnr"], "ssim": v["ssim"]} for k, v in torch_metrics.items()},
                      "cpu_backend": {"Set5": {"psnr": cpu_metrics["Set5"]["psnr"]}}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bundled_models.json")
    args = parser.parse_args()
    data = shared_data_dir()
    if data is None:
        sys.exit("no shared data: set QUANTSR_DATA")
    result = {"benchmark": "bundled_models", "code_version": code_version(), "machine": machine(),
              "published": PUBLISHED, "rows": measure(data / "weights")}
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()

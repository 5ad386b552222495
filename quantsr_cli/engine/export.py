"""``quantsr export``: write a loaded model as ONNX (``.onnx``) or OpenVINO IR (``.xml`` + ``.bin``).

After writing, the file is run once in its runtime on a small random input and compared with the
``torch`` backend (``max_abs_diff`` in the report), so a broken export is noticed at once.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from quantsr_cli.backends import use_backend
from quantsr_cli.engine.modelio import LoadedModel
from quantsr_cli.errors import ConfigError, ImageError

FORMATS = {".onnx": "onnx", ".xml": "openvino"}


def export_format(output: str | Path) -> str:
    """``onnx`` or ``openvino`` from the output suffix; ConfigError for anything else."""
    fmt = FORMATS.get(Path(output).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{output}: export to FILE.onnx (ONNX) or FILE.xml (OpenVINO IR)")
    return fmt


def _check_output(output: Path) -> None:
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise ImageError("is a folder; give a file name ending in .onnx or .xml", output)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ImageError("output folder does not exist or is not writable", folder)


def _max_diff(loaded: LoadedModel, output: Path) -> float:
    """Max |runtime - torch backend| on a random (1, 3, ~20, ~28) input (a multiple of the window)."""
    from quantsr_cli.backends.runtime_common import input_multiple

    torch.manual_seed(0)
    m = input_multiple(loaded.model)
    x = torch.rand(1, 3, -(-20 // m) * m, -(-28 // m) * m)
    ref = copy.deepcopy(loaded.model).cpu().eval()
    use_backend(ref, "torch")
    with torch.inference_mode():
        expected = ref(x)
    from quantsr_cli.backends.exported import load_exported

    got = load_exported(output, threads=1)[0](x)  # the written file, loaded as `eval --model FILE` loads it
    return float((got - expected).abs().max())


def run_export(loaded: LoadedModel, output: str | Path, *, check: bool = True) -> dict[str, Any]:
    """Export ``loaded`` to ``output`` (format from its suffix); returns the ``--json`` report."""
    output = Path(output)
    fmt = export_format(output)
    if loaded.kind.startswith("diffusion"):
        raise ConfigError(f"{loaded.source}: diffusion models cannot be exported (SR models only)")
    _check_output(output)
    model = copy.deepcopy(loaded.model).cpu().eval()
    use_backend(model, "torch")
    if fmt == "onnx":
        from quantsr_cli.backends.export_onnx import export_onnx

        info = export_onnx(model, output)
    else:
        from quantsr_cli.backends.export_openvino import export_openvino

        info = export_openvino(model, output)
    report: dict[str, Any] = {"model": loaded.source, "label": loaded.label, "out": str(output), **info}
    if fmt == "openvino":
        report["bin"] = str(output.with_suffix(".bin"))
    if check:
        report["max_abs_diff"] = _max_diff(loaded, output)
    return report

"""``quantsr export``: a model as ONNX (Q/DQ) or OpenVINO IR, runnable without quantsr."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import JsonOpt, ScaleOpt, examples, log, print_json
from quantsr_cli.engine.export import run_export
from quantsr_cli.engine.modelio import load_model

EXAMPLES = examples("quantsr export default -o default_x4.xml            # OpenVINO IR (+ default_x4.bin)",
                    "quantsr export runs/imdn_x4_w4a4/qat_best.safetensors -o model.onnx   # ONNX Q/DQ")


def export(
    model: Annotated[str, typer.Argument(help="Model file or bundled name (default, default-w2).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.onnx (ONNX) or FILE.xml (OpenVINO IR).")],
    arch: Annotated[str | None, typer.Option("--arch", help="Architecture of a foreign .pth.", show_default="detected from the keys")] = None,
    scale: ScaleOpt = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Run the file once and compare with the torch backend.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Export a model to ONNX (QuantizeLinear/DequantizeLinear) or OpenVINO IR (FakeQuantize), dynamic H/W."""
    loaded = load_model(model, arch=arch, scale=scale)
    report = run_export(loaded, output, check=check)
    if json_out:
        print_json(report)
        return
    diff = f", max |diff| vs torch {report['max_abs_diff']:.1e}" if "max_abs_diff" in report else ""
    log(f"{loaded.label} -> {report['format']}: {report['bytes']:,} bytes{diff}")
    typer.echo(str(output))



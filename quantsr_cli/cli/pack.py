"""``quantsr pack``: convert a fake-quant training checkpoint into the packed format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import JsonOpt, examples, log, print_json
from quantsr_cli.engine.report import pack_file

EXAMPLES = examples("quantsr pack runs/imdn_x4_w4a4/qat_best.safetensors -o imdn_w4.safetensors")


def pack(
    model: Annotated[str, typer.Argument(help="A qat model file (qat_best/qat_last of a run).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Packed safetensors file to write.")],
    json_out: JsonOpt = False,
) -> None:
    """Bit-pack a fake-quant (qat) model file: integer codes, scales and activation parameters."""
    report = pack_file(model, output)
    if json_out:
        print_json({"out": str(output), **report})
        return
    log(f"packed {report['quantized_params']:,} quantized params; {report['file_bytes']:,} bytes "
        f"({report['compression']:.2f}x smaller than FP32)")
    typer.echo(str(output))

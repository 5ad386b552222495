"""``quantsr distill``: QuantSR+ SFD, feature distillation from a full-precision teacher."""

from __future__ import annotations

from typing import Annotated

import typer

from quantsr_cli.cli.common import DeviceOpt, JsonOpt, examples
from quantsr_cli.cli.quantize import run_training_command
from quantsr_cli.cli.trainopts import Config, Out, Preset, PrintConfig, Resume, RunDir, training_command
from quantsr_cli.presets.resolve import Layer
from quantsr_cli.quant import method_names

EXAMPLES = examples("quantsr distill --model runs/imdn_x4_w2a2/qat_best.safetensors --teacher IMDN_x4.pth",
                    "quantsr distill --model default-w2 --teacher IMDN_x4.pth --iters 500 --print-config")


@training_command("distill")
def distill(
    flags: Layer,
    model: Annotated[str, typer.Option("--model", "-m", help="Student: a quantized model (qat file, or a packed "
                                       f"{'/'.join(method_names(fine_tunable=True))} file or bundled name).")],
    preset: Preset = None,
    config: Config = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    out: Out = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    print_config: PrintConfig = False,
) -> None:
    """SFD: fine-tune a quantized student with L1 + feature distillation from an FP teacher."""
    run_training_command(flags, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model,
                         print_config=print_config, command="distill")

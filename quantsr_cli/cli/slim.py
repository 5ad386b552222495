"""``quantsr slim``: QuantSR+ QSA, removing residual blocks during quantization-aware training."""

from __future__ import annotations

from quantsr_cli.cli.common import DeviceOpt, JsonOpt, examples
from quantsr_cli.cli.quantize import run_training_command
from quantsr_cli.cli.trainopts import Config, Out, Preset, PrintConfig, Resume, RunDir, StartModel, training_command
from quantsr_cli.errors import ConfigError
from quantsr_cli.presets.resolve import Layer

EXAMPLES = examples("quantsr slim --model runs/quantsr-c_x4_w2a2/qat_last.safetensors --target-blocks 8",
                    "quantsr slim --arch quantsr-c --bits 2 --target-blocks 8 --print-config")


@training_command("slim")
def slim(
    flags: Layer,
    model: StartModel = None,
    preset: Preset = None,
    config: Config = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    out: Out = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    print_config: PrintConfig = False,
) -> None:
    """QSA: train a quantized model while removing residual blocks until --target-blocks remain.

    Starts from --model (a quantized file) or from a fresh model: --init FILE (its architecture is detected)
    or --arch NAME (with --bits, --blocks).
    """
    fresh = "arch" in flags.values or "init" in flags.values
    if (model is None) != fresh:
        raise ConfigError("give either --model QAT_FILE, or --init FILE / --arch NAME for a fresh model")
    target = flags.values["slim_to"]
    if target < 1:
        raise ConfigError(f"--target-blocks {target} must be at least 1")
    run_training_command(flags, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model,
                         print_config=print_config, command="slim")

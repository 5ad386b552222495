"""``quantsr quantize``: quantization-aware training of an SR model."""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from quantsr_cli.cli.common import DeviceOpt, JsonOpt, TrainRenderer, examples, log, print_json
from quantsr_cli.cli.trainopts import (
    Config,
    Out,
    Preset,
    PrintConfig,
    Resume,
    RunDir,
    StartModel,
    print_resolved,
    training_command,
)
from quantsr_cli.config import SCALES, ModelConfig, QuantConfig, TrainConfig
from quantsr_cli.engine.modelio import EXPORTED_SUFFIXES, read_model_meta
from quantsr_cli.engine.quantize import QuantizeJob, check_rebuildable, init_arch, run_quantize
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import ARCHS
from quantsr_cli.presets.resolve import Layer, Resolved, resolve

EXAMPLES = examples("quantsr quantize --preset imdn_x4_w4a4                 # presets: quantsr presets",
                    "quantsr quantize --arch swinir-s --bits 2 --iters 500 --print-config")

def resolve_options(flags: Layer | Mapping[str, Any], config: Path | None, preset: str | None,
                    start: Layer | None = None) -> tuple[Resolved, str | None]:
    """Merge options with precedence ``start`` (values read from ``--model``) > flags > --config file > preset
    > defaults.

    Returns the resolved options and the name of the preset used (auto-selected as
    ``<arch>_x<scale>_w<b>a<b>`` when it exists and none was named). ``flags`` may be a plain mapping of
    option name to value (``None`` = not given), as tests and scripts write it.
    """
    if not isinstance(flags, Layer):
        flags = Layer.of("flag", flags)
    layers = [layer for layer in (start, flags) if layer is not None]
    resolved = resolve(layers, config, preset)
    init = resolved.values.get("init")
    found = init_layer(str(init), resolved) if init and start is None else None
    if found is not None:  # the file decides the architecture (and the scale unless one is given)
        resolved = resolve([*layers, found], config, preset)
        if resolved.values.get("init") != init:  # the auto-selected preset brought another init: check that one
            again = init_layer(str(resolved.values["init"]), resolved)
            resolved = resolve([*layers, *([again] if again is not None else [])], config, preset)
    return resolved, resolved.preset


def init_layer(init: str, resolved: Resolved) -> Layer | None:
    """The options an ``--init`` file fixes: its detected architecture and scale (below the flags and the
    ``--config`` file, above a preset). An ``arch`` that names another architecture is an error naming both;
    the fallback family's name (spandrel's) takes a built-in file down the generic path instead. None when
    the file cannot be read: loading it reports why, when the run starts."""
    try:
        arch, hparams = init_arch(init)
    except CheckpointError as exc:
        if exc.path is not None and Path(exc.path).suffix.lower() in EXPORTED_SUFFIXES:
            raise  # an exported file: say so now, not "--arch is required"
        return None
    wanted = resolved.values.get("arch")
    if wanted and wanted != arch:
        spec = ARCHS.get(wanted)
        if spec is None or not spec.fallback:
            raise ConfigError(f"--arch {wanted} conflicts with --init {init}, which holds "
                              f"{ARCHS[arch].display(hparams)} weights (omit --arch: it is read from the file)")
        arch = wanted
    values: dict[str, Any] = {"arch": arch}
    if "upscale" in hparams and resolved.source("scale") in ("default", f"preset {resolved.preset}"):
        values["scale"] = int(hparams["upscale"])
    _INIT_NAMES[init] = run_label(arch, hparams)
    return Layer.of(f"--init {init}", values)


_INIT_NAMES: dict[str, str] = {}
"""Run names of the ``--init`` files detected in this process (``esrgan-spandrel`` for a foreign file)."""


def run_label(arch: str, hparams: Mapping[str, Any]) -> str:
    """A file-name-safe run name for a detected architecture (a built-in arch: its name)."""
    spec = ARCHS.get(arch)
    if spec is None or not spec.fallback:
        return arch
    label = re.sub(r"[^a-z0-9]+", "-", spec.display(hparams).lower()).strip("-")
    return label[:40] or arch


def build_job(opts: Resolved, *, run_dir: Path | None, out: Path | None, resume: bool, device: str) -> QuantizeJob:
    """Turn resolved options into a validated :class:`QuantizeJob` (typed configs all the way down)."""
    if not opts.values.get("arch"):
        raise ConfigError(f"--arch is required ({', '.join(ARCHS)}) unless --init FILE, a --preset or --config "
                          "sets it")
    return QuantizeJob(
        **opts.kwargs(ModelConfig), quant=opts.build(QuantConfig), train=opts.build(TrainConfig),
        run_dir=run_dir, out=out, resume=resume, device=device, command=shlex.join(["quantsr", *sys.argv[1:]]),
        name=_INIT_NAMES.get(str(opts.values.get("init")), "") if opts.values.get("init") else "",
    )


@training_command("quantize")
def quantize(
    flags: Layer,
    preset: Preset = None,
    config: Config = None,
    model: StartModel = None,
    run_dir: RunDir = None,
    resume: Resume = False,
    out: Out = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
    print_config: PrintConfig = False,
) -> None:
    """Quantization-aware training of an SR model at W/A 2, 4 or 8 bits.

    With --model, training continues from a quantsr model instead (arch, scale, method and bits come
    from the file; a packed file of a fine-tunable method or a bundled name such as ``default`` is
    fine-tuned from its codes, see ``quantsr_cli.packing.unpack``).
    """
    fresh_only = {"arch", "init", "blocks"} & flags.values.keys() or flags.values.get("share_qv_quantizer")
    if model is not None and fresh_only:
        raise ConfigError("--model continues from a model file; it cannot be combined with --arch, --init, --blocks "
                          "or --share-qv-quantizer")
    run_training_command(flags, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model, print_config=print_config)


def start_model_layer(start_model: str) -> Layer:
    """The options a ``--model`` file fixes (arch, scale, method, bits), read from its metadata."""
    meta = read_model_meta(start_model)
    if meta.get("kind") not in ("qat", "packed"):
        raise ConfigError(f"--model {start_model}: expected a quantized (qat or packed) model file, got "
                          f"{meta.get('kind')!r}; use the qat_last/qat_best file of a quantize run")
    # These values name the run folder: only accept registered archs and known scales from a file.
    if meta.get("arch") not in ARCHS or meta.get("scale") not in SCALES or not all(
        k in meta for k in ("method", "w_bits", "a_bits")
    ):
        raise CheckpointError("metadata has no valid arch/scale/method/bits; not a quantsr qat file", start_model)
    if meta["kind"] == "packed":
        check_rebuildable(meta["method"], f"--model {start_model}")
    try:
        return Layer.of(f"--model {start_model}", {k: meta[k] for k in ("arch", "scale", "method", "w_bits", "a_bits")})
    except ConfigError as exc:
        raise CheckpointError(f"metadata: {exc}", start_model) from None


def run_training_command(
    flags: Layer,
    *,
    config: Path | None,
    preset: str | None,
    run_dir: Path | None,
    resume: bool,
    out: Path | None,
    device: str,
    json_out: bool,
    start_model: str | None = None,
    print_config: bool = False,
    command: str = "quantize",
) -> None:
    """Shared body of ``quantize``, ``slim`` and ``distill``: merge options, train, report.

    With ``print_config`` the resolved options are printed with their sources instead of training.
    """
    start = start_model_layer(start_model) if start_model is not None else None
    opts, used_preset = resolve_options(flags, config, preset, start=start)
    job = build_job(opts, run_dir=run_dir, out=out, resume=resume, device=device)
    job = replace(job, run_dir=job.run_dir or Path("runs") / job.run_name, start_model=start_model)
    if print_config:
        print_resolved(opts, command, job.run_dir, json_out)
        return
    log(f"run directory: {job.run_dir}" + (f"  (preset {used_preset})" if used_preset else ""))
    start = (f"--model {start_model}" if start_model else f"--init {job.init}" if job.init
             else "fresh random weights (no --init)")
    log(f"model: {job.name or job.arch} x{job.scale}, starting from {start}")
    renderer = TrainRenderer(f"{job.name or job.arch} W{job.quant.w_bits}A{job.quant.a_bits}",
                             enabled=int(os.environ.get("RANK", "0")) == 0)
    try:
        summary = run_quantize(job, on_event=renderer)
    finally:
        renderer.close()
    if not summary:
        return
    if json_out:
        print_json(summary)
    else:
        best = summary.get("best_psnr")
        log(f"best val PSNR: {best:.3f} dB at iteration {summary['best_iter']}" if best else "no validation run")
        sys.stdout.write(f"{summary['out']}\n")

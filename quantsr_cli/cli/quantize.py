"""``quantsr quantize``: quantization-aware training of an SR model."""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from quantsr_cli.cli.common import DeviceOpt, JsonOpt, TrainRenderer, finite, log, print_json, progress_bar
from quantsr_cli.cli.trainopts import StartModel
from quantsr_cli.config import SCALES, QuantConfig, TrainConfig
from quantsr_cli.engine.modelio import read_model_meta
from quantsr_cli.engine.quantize import QuantizeJob, check_rebuildable, init_arch, run_quantize
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.models import ARCHS
from quantsr_cli.presets import list_presets, load_config_file, load_preset
from quantsr_cli.quant import METHODS

_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def resolve_options(cli: dict[str, Any], config: Path | None, preset: str | None) -> tuple[dict[str, Any], str | None]:
    """Merge options with precedence CLI flag > --config file > preset > defaults.

    An ``init`` file decides the architecture and, unless given, the scale: they are detected from it
    (:func:`~quantsr_cli.engine.quantize.init_arch`), and an ``arch`` that names another architecture is an
    error naming both (the fallback family's name, e.g. spandrel's, takes a built-in file down the generic
    path instead).

    Returns the merged options and the name of the preset used (auto-selected as
    ``<arch>_x<scale>_w<b>a<b>`` when it exists and none was named).
    """
    given = {k: v for k, v in cli.items() if v is not None}
    file_opts = load_config_file(config) if config is not None else {}
    probe = {**file_opts, **given}
    found = _detected_init(probe) if probe.get("init") else None
    if found is not None:
        given.update(found)
        probe.update(found)
    if preset is None:
        arch, scale = probe.get("arch"), probe.get("scale", 4)
        wb = probe.get("w_bits", probe.get("bits"))
        ab = probe.get("a_bits", probe.get("bits"))
        candidate = f"{arch}_x{scale}_w{wb}a{ab}"
        if arch and wb and candidate in list_presets():
            preset = candidate
    preset_opts = load_preset(preset) if preset else {}
    preset_opts.pop("description", None)
    file_opts.pop("description", None)
    merged = {**preset_opts, **file_opts, **given}
    if found is None and merged.get("init") and merged.get("init") != probe.get("init"):
        merged.update(_detected_init(merged))  # the preset's own init: check it against its arch
    return merged, preset


def _detected_init(opts: dict[str, Any]) -> dict[str, Any]:
    """``arch``, ``scale`` and a run name from the ``init`` file; ConfigError when ``arch`` names another one."""
    arch, hparams = init_arch(str(opts["init"]))
    wanted = opts.get("arch")
    if wanted is not None and wanted != arch:
        spec = ARCHS.get(wanted)
        if spec is None or not spec.fallback:
            raise ConfigError(f"--arch {wanted} conflicts with --init {opts['init']}, which holds "
                              f"{ARCHS[arch].display(hparams)} weights (omit --arch: it is read from the file)")
        arch = wanted  # the generic path for a built-in file
    found: dict[str, Any] = {"arch": arch, "name": _run_label(arch, hparams)}
    if "upscale" in hparams and opts.get("scale") is None:
        found["scale"] = int(hparams["upscale"])
    return found


def _run_label(arch: str, hparams: dict[str, Any]) -> str:
    """A file-name-safe run name for a detected architecture (``esrgan``; a built-in arch: its name)."""
    spec = ARCHS.get(arch)
    if spec is None or not spec.fallback:
        return arch
    label = re.sub(r"[^a-z0-9]+", "-", spec.display(hparams).lower()).strip("-")
    return label[:40] or arch


def build_job(opts: dict[str, Any], *, run_dir: Path | None, out: Path | None, resume: bool, device: str) -> QuantizeJob:
    """Turn merged options into a validated :class:`QuantizeJob`."""
    arch = opts.get("arch")
    if not arch:
        raise ConfigError(f"--arch is required ({', '.join(ARCHS)}) unless --init FILE, a --preset or --config "
                          "sets it")
    bits = opts.get("bits")
    w_bits = opts.get("w_bits", bits if bits is not None else 4)
    a_bits = opts.get("a_bits", bits if bits is not None else 4)
    if bits == 32:
        w_bits = a_bits = 32
    quant = QuantConfig(method=opts.get("method", QuantConfig.method), w_bits=int(w_bits), a_bits=int(a_bits),
                        act_sign=opts.get("act_sign", "min"), layers=opts.get("layers", ()))
    train_kwargs = {k: v for k, v in opts.items() if k in _TRAIN_FIELDS}
    for key in ("train_data", "milestones"):
        if key in train_kwargs:
            train_kwargs[key] = tuple(train_kwargs[key])
    train = TrainConfig(**train_kwargs)
    scale = int(opts.get("scale", 4))
    if scale not in (2, 3, 4):
        raise ConfigError(f"--scale {scale} is not supported; choose 2, 3 or 4")
    return QuantizeJob(
        arch=arch, scale=scale, quant=quant, train=train, init=opts.get("init"), blocks=opts.get("blocks"),
        run_dir=run_dir, out=out, resume=resume, device=device,
        command=shlex.join(["quantsr", *sys.argv[1:]]),
        share_qv_quantizer=bool(opts.get("share_qv_quantizer", False)), name=str(opts.get("name") or ""),
    )


def quantize(
    arch: Annotated[str | None, typer.Option("--arch", "-a", help=f"{', '.join(ARCHS)}.")] = None,
    bits: Annotated[int | None, typer.Option("--bits", "-b", help="Weight and activation bits: 2, 4, 8 (32 = full precision).")] = None,
    w_bits: Annotated[int | None, typer.Option("--w-bits", help="Weight bits (overrides --bits).")] = None,
    a_bits: Annotated[int | None, typer.Option("--a-bits", help="Activation bits (overrides --bits).")] = None,
    method: Annotated[str | None, typer.Option("--method", help=f"Quantizer: {', '.join(METHODS)} [default: {QuantConfig.method}].")] = None,
    scale: Annotated[int | None, typer.Option("--scale", "-s", help="Upscaling factor 2, 3 or 4 [default: 4].")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Full-precision pretrained weights (.pth/.pt/.ckpt/.safetensors); the architecture and scale are detected from it.")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="Residual blocks of the arch (archs of fixed depth refuse it).")] = None,
    train_data: Annotated[list[str] | None, typer.Option("--train-data", help="HR image folder; repeatable [default: $QUANTSR_DATA/train/*].")] = None,
    val_dataset: Annotated[str | None, typer.Option("--val-dataset", help="Validation benchmark [default: Set5].")] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Training iterations (0 = post-training quantization: calibrate with bias correction and pack, no training; needs --init).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Patches per iteration.")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="HR patch side in pixels.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate [default: 2e-4].", callback=finite)] = None,
    val_every: Annotated[int | None, typer.Option("--val-every", help="Validate every N iterations (0 = never).")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Write a resumable checkpoint every N iterations.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Torch CPU threads (0 = torch default).")] = None,
    dqa: Annotated[bool | None, typer.Option("--dqa/--no-dqa", help="QuantSR depth-dynamic training (full, 1/2, 1/4 depth).")] = None,
    slim_to: Annotated[int | None, typer.Option("--slim-to", help="QSA: remove blocks during training until N remain.")] = None,
    distill: Annotated[str | None, typer.Option("--distill", help="SFD: full-precision teacher model file.")] = None,
    feature_weight: Annotated[float | None, typer.Option("--feature-weight", help="SFD feature loss weight [default: 1e-4].", callback=finite)] = None,
    act_sign: Annotated[str | None, typer.Option("--act-sign", help="Activation grid choice on the first batch: min (released code: signed if any value < 0) or mse [default: min].")] = None,
    bias_correction: Annotated[bool | None, typer.Option("--bias-correction/--no-bias-correction", help="Correct FP biases for the quantization error on the calibration batch [default: on].")] = None,
    ema_decay: Annotated[float | None, typer.Option("--ema-decay", help="Validate and write an EMA of the weights (BasicSR: 0.999) [default: 0 = off].", callback=finite)] = None,
    share_qv_quantizer: Annotated[bool | None, typer.Option("--share-qv-quantizer/--no-share-qv-quantizer", help="swinir-s: quantize attention v with q's quantizer, as the released QuantSR code does [default: off, v has its own].")] = None,
    drop_path_rate: Annotated[float | None, typer.Option("--drop-path-rate", help="swinir-s stochastic depth during training (released QuantSR-T: 0.1, set by the swinir-s presets) [default: 0 = off].", callback=finite)] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="Bundled preset name (auto: <arch>_x<scale>_w<b>a<b>).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of options (overridden by flags).")] = None,
    model: StartModel = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run folder [default: runs/<arch>_x<scale>_w<b>a<b>].")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Packed model file to write [default: <run-dir>/model.safetensors].")] = None,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Quantization-aware training of an SR model at W/A 2, 4 or 8 bits.

    With --model, training continues from a quantsr model instead (arch, scale, method and bits come
    from the file; a packed file of a fine-tunable method or a bundled name such as ``default`` is
    fine-tuned from its codes, see ``quantsr_cli.packing.unpack``).
    """
    if model is not None and (arch is not None or init is not None or blocks is not None or share_qv_quantizer):
        raise ConfigError("--model continues from a model file; it cannot be combined with --arch, --init, --blocks "
                          "or --share-qv-quantizer")
    cli = dict(arch=arch, bits=bits, w_bits=w_bits, a_bits=a_bits, method=method, scale=scale, init=init,
               blocks=blocks, train_data=train_data or None, val_dataset=val_dataset, iters=iters,
               batch_size=batch_size, patch_size=patch_size, lr=lr, val_every=val_every, save_every=save_every,
               seed=seed, threads=threads, dqa=dqa, slim_to=slim_to, distill=distill, feature_weight=feature_weight,
               act_sign=act_sign, bias_correction=bias_correction, ema_decay=ema_decay,
               share_qv_quantizer=share_qv_quantizer, drop_path_rate=drop_path_rate)
    run_training_command(cli, config=config, preset=preset, run_dir=run_dir, resume=resume, out=out,
                         device=device, json_out=json_out, start_model=model)


def run_training_command(
    cli: dict[str, Any],
    *,
    config: Path | None,
    preset: str | None,
    run_dir: Path | None,
    resume: bool,
    out: Path | None,
    device: str,
    json_out: bool,
    start_model: str | None = None,
) -> None:
    """Shared body of ``quantize``, ``slim`` and ``distill``: merge options, train, report."""
    if start_model is not None:
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
        for key in ("arch", "scale", "method", "w_bits", "a_bits"):
            cli[key] = meta[key]
    opts, used_preset = resolve_options(cli, config, preset)
    job = build_job(opts, run_dir=run_dir, out=out, resume=resume, device=device)
    job = replace(job, run_dir=job.run_dir or Path("runs") / job.run_name, start_model=start_model)
    log(f"run directory: {job.run_dir}" + (f"  (preset {used_preset})" if used_preset else ""))
    with progress_bar(enabled=int(os.environ.get("RANK", "0")) == 0) as progress:
        renderer = TrainRenderer(progress, job.train.iters, f"{job.arch} W{job.quant.w_bits}A{job.quant.a_bits}")
        summary = run_quantize(job, on_event=renderer)
    if not summary:
        return
    if json_out:
        print_json(summary)
    else:
        best = summary.get("best_psnr")
        log(f"best val PSNR: {best:.3f} dB at iteration {summary['best_iter']}" if best else "no validation run")
        sys.stdout.write(f"{summary['out']}\n")

"""``quantsr quantize``: build (or load) a model, attach quantizers, train it, write the results.

A run directory holds everything a run produces::

    runs/<arch>_x<scale>_w<b>a<b>/
      checkpoints/state_*.safetensors   resumable states (model, optimizer, RNG, counters)
      train_log.jsonl                   loss/lr/it/s every log_every iterations, validation, saves, slimming
      visualization/<dataset>/          validation images (save_val_images), tensorboard/ (--tensorboard)
      qat_best.safetensors              fake-quant model with the best validation PSNR
      qat_last.safetensors              fake-quant model after the last iteration
      model.safetensors                 the packed model (or --out), built from qat_best
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.config import ModelConfig, QuantConfig, TrainConfig
from quantsr_cli.distill import FeatureDistillHook
from quantsr_cli.data import TrainDataset, check_patch_size, no_data_hint, shared_data_dir
from quantsr_cli.engine.initmodel import (  # noqa: F401 (re-exported: the start of a run)
    build_initial_model,
    init_arch,
    extend_start_model,
    load_into_deeper,
    load_start_model,
    random_init_notice,
)
from quantsr_cli.engine.modelio import load_model, resolve_model_path
from quantsr_cli.engine.outputs import check_model_output, check_outputs, check_run_dir, clean_temp_files
from quantsr_cli.engine.runlock import RunDirLock
from quantsr_cli.engine import tblog
from quantsr_cli.engine.trainer import Trainer
from quantsr_cli.engine.validation import check_val_dataset, make_validator
from quantsr_cli.errors import ConfigError, QuantSRError
from quantsr_cli.fileio import write_json
from quantsr_cli.models import ARCHS, arch_spec, build_model, make_shortcuts_learnable
from quantsr_cli.packing import io as packing_io
from quantsr_cli.packing.unpack import check_rebuildable  # noqa: F401 (for the CLI)
from quantsr_cli.quant import calibrate_, initialize_pending_, method_spec, pending_quantizers, quantize_
from quantsr_cli.slim import SlimHook, compact_state_dict, dqa_keep_lists, dqa_variants

EventFn = Callable[[dict[str, Any]], None]

RUN_FILES = ("qat_last.safetensors", "qat_best.safetensors", "summary.json", "train_log.jsonl")
"""Files every training run writes into its run folder (besides ``checkpoints/`` and the packed model)."""


@dataclass(frozen=True)
class QuantizeJob(ModelConfig):
    """Everything ``quantsr quantize`` needs, after option precedence has been applied.

    The model options (``arch``, ``scale``, ``init``, ``blocks``, ``share_qv_quantizer``) are declared on
    :class:`~quantsr_cli.config.ModelConfig`; ``share_qv_quantizer`` builds the fresh model with attention v
    quantized by q's quantizer (the released QuantSR code; ``swinir-s`` only); a ``start_model`` keeps
    whatever its file says.
    """

    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: Path | None = None
    out: Path | None = None
    resume: bool = False
    device: str = "cpu"
    command: str = ""
    start_model: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()  # ModelConfig: scale, blocks
        method_spec(self.quant.method)  # an unknown method is refused before anything is loaded
        spec = ARCHS.get(self.arch)
        if spec is not None and spec.family != "sr":  # unknown names are refused when the model is built
            raise ConfigError(f"arch {self.arch!r} is a {spec.family} model: use `quantsr diffusion quantize`")
        if self.train.iters == 0 and self.start_model is not None:
            raise ConfigError("iters=0 calibrates and packs FP weights (--init); --model continues training a "
                              "quantized model, so give it --iters N")
        if self.train.iters == 0 and not self.init:
            raise ConfigError("iters=0 (calibrate and pack, no training) needs pretrained weights: pass --init FILE")
        if self.train.iters == 0 and self.quant.full_precision:
            raise ConfigError("iters=0 with 32 bits has nothing to calibrate; choose --bits 2, 4 or 8")

    @property
    def run_name(self) -> str:
        """``<arch or name>_x<scale>_w<b>a<b>`` (``name``: a detected foreign architecture, e.g. ``esrgan``)."""
        bits = "fp32" if self.quant.full_precision else f"w{self.quant.w_bits}a{self.quant.a_bits}"
        return f"{self.name or self.arch}_x{self.scale}_{bits}"


def compact_model(model: nn.Module, quant: QuantConfig, keep: list[int]) -> nn.Module:
    """A new model holding only the blocks ``keep`` of ``model`` (renumbered), quantized like it."""
    new = build_model(model.arch, **arch_spec(model.arch).keep_blocks(model.hparams, keep))
    if not quant.full_precision:
        quantize_(new, quant)
    prefix = model.block_names()[0].rsplit(".", 1)[0]
    new.load_state_dict(compact_state_dict(model.state_dict(), prefix, keep), strict=True)
    return new


def model_metadata(model: nn.Module, quant: QuantConfig, kind: str, extra: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata that lets :func:`quantsr_cli.packing.io.load_model_file` rebuild ``model``."""
    file_kind = "fp" if quant.full_precision else "qat"
    meta = packing_io.model_metadata(model, file_kind, quant, extra)
    meta["kind"] = kind
    return meta


def write_model_file(model: nn.Module, path: Path, quant: QuantConfig, extra: dict[str, Any]) -> Path:
    """Write the float/fake-quant state of ``model`` as a ``qat`` (or ``fp``) safetensors file."""
    packing_io.save_model(model, path, quant, extra)
    return path


def write_packed_file(model: nn.Module, path: Path, quant: QuantConfig, extra: dict[str, Any]) -> Path:
    """Bit-pack the quantized layers of ``model`` and write them (FP models are written as ``fp``)."""
    packing_io.save_model(model, path, quant, extra, pack=not quant.full_precision)
    return path


def default_train_dirs() -> tuple[str, ...]:
    """``$QUANTSR_DATA/train/*`` folders (T91, BSD200 in the shared data)."""
    shared = shared_data_dir()
    if shared is None:
        raise ConfigError(f"no training data: pass --train-data DIR, or: {no_data_hint()}")
    root = shared / "train"
    dirs = sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not dirs:
        raise ConfigError(f"no training data: {root} has no image folders; pass --train-data DIR")
    return tuple(dirs)


def phase(on_event: EventFn | None, name: str, message: str = "") -> None:
    """Tell the display what the run is doing now (``loading data``, ``calibrating`` ...)."""
    if on_event is not None and int(os.environ.get("RANK", "0")) == 0:
        on_event({"event": "phase", "phase": name, "message": message})


def init_distributed() -> None:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, NCCL on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)


def prepare_training(job: QuantizeJob, model: nn.Module, on_event: EventFn | None) -> Trainer:
    """Quantize ``model``, set up data, validation and the trainer (resuming when asked)."""
    cfg = job.train
    check_patch_size(cfg.patch_size, job.scale)  # before the data is looked for: a bad flag is the error to report
    if cfg.val_dataset and cfg.val_every > 0:
        check_val_dataset(cfg.val_dataset, job.scale)  # a wrong name fails now, not at the first validation
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = job.run_dir or Path("runs") / job.run_name
    init_distributed()
    set_drop_path = getattr(model, "set_drop_path", None)
    if cfg.drop_path_rate and set_drop_path is None:
        having = ", ".join(n for n, s in ARCHS.items() if callable(getattr(s.builder, "set_drop_path", None)))
        raise ConfigError(f"drop_path_rate={cfg.drop_path_rate}: arch {job.arch!r} has no stochastic depth "
                          f"({having} has); use 0")
    if not job.quant.full_precision and job.start_model is None:
        quantize_(model, job.quant)
    device = torch.device(job.device)
    model.to(device)
    if cfg.tensorboard:
        tblog.require_tensorboard()
    train_dirs = cfg.train_data or default_train_dirs()
    phase(on_event, "loading data", ", ".join(os.path.basename(d.rstrip("/\\")) for d in train_dirs))
    data = TrainDataset(list(train_dirs), scale=job.scale, patch_size=cfg.patch_size, seed=cfg.seed)
    if on_event is not None:
        on_event({"event": "log", "message": f"training data: {len(data.hr)} images" + (
            f" ({len(data.skipped)} smaller than the {cfg.patch_size}-px patch left out)" if data.skipped else "")})
    if job.start_model is None:
        phase(on_event, "calibrating", f"{cfg.batch_size} patches")
        calibrate_(model, data.sample_batch(0, cfg.batch_size)[0].to(device),
                  bias_correction=cfg.bias_correction and not job.quant.full_precision)
    elif pending := len(pending_quantizers(model)):  # layers the run's rules added to a --model file
        phase(on_event, "calibrating", f"{pending} new quantizers, {cfg.batch_size} patches")
        initialize_pending_(model, data.sample_batch(0, cfg.batch_size)[0].to(device))
    if cfg.drop_path_rate:  # after calibration: the quantizers initialise on the whole network
        set_drop_path(cfg.drop_path_rate)
    validate = make_validator(job.scale, cfg.val_dataset, cfg.val_max_images, job.arch, run_dir=run_dir,
                              save_images=cfg.save_val_images) if cfg.val_dataset else None
    extra: dict[str, Any] = {"command": job.command, "iters": cfg.iters, "act_sign": job.quant.act_sign,
                             **({"start_model": os.path.basename(job.start_model)} if job.start_model else {}),
                             "bias_correction": cfg.bias_correction,
                             **({"ema_decay": cfg.ema_decay} if cfg.ema_decay else {}),
                             **({"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}),
                             "train_data": [os.path.basename(d) for d in train_dirs]}
    hooks: list[Any] = []
    variants = []
    if cfg.dqa:
        if cfg.slim_to:
            raise ConfigError("--dqa and --slim-to cannot be combined")
        variants = dqa_variants(model)
        extra["dqa"] = dqa_keep_lists(len(model.block_names()))
    if cfg.slim_to:
        if arch_spec(job.arch).depth is None:  # the slimmed model is compacted at the end of the run
            raise ConfigError(f"--slim-to: arch {job.arch!r} has a fixed depth; its blocks cannot be removed")
        make_shortcuts_learnable(model)  # QSA ranks blocks by their trainable identity scalars
        hooks.append(SlimHook(model, cfg.slim_to, cfg.iters, cfg.slim_start_ratio))
    if cfg.distill:
        teacher = load_model(cfg.distill, scale=job.scale, device=device)
        if teacher.detected and on_event is not None:
            on_event({"event": "log", "message": f"teacher: {teacher.detected}"})
        if teacher.kind != "fp":
            raise ConfigError(f"--distill {cfg.distill}: the teacher must be a full-precision model, not {teacher.kind}")
        hooks.append(FeatureDistillHook(model, teacher.model, cfg.feature_weight))
        extra["distill"] = {"teacher": os.path.basename(cfg.distill), "feature_weight": cfg.feature_weight}
    trainer = Trainer(
        model=model, cfg=cfg, run_dir=run_dir, sample_batch=data.sample_batch, validate=validate,
        model_meta=model_metadata(model, job.quant, "train_state", extra), variants=variants, hooks=hooks,
        on_event=on_event, device=device,
    )
    has_states = any((run_dir / "checkpoints").glob("state_*.safetensors"))
    if job.resume:
        if not trainer.resume():
            trainer.emit({"event": "log", "message": f"no checkpoint in {run_dir}; starting fresh"})
    elif has_states:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue or choose another --run-dir")
    if cfg.tensorboard:
        trainer.sinks = [tblog.TensorBoardLog(run_dir / "tensorboard")]
    return trainer


def finish_training(job: QuantizeJob, trainer: Trainer) -> dict[str, Any]:
    """Write qat_last / packed outputs and return the run summary (also saved as summary.json)."""
    run_dir = trainer.run_dir
    extra = dict(json.loads(trainer.model_meta["extra"]))
    extra.update({"best_psnr": trainer.best_psnr if math.isfinite(trainer.best_psnr) else None,
                  "best_iter": trainer.best_iter, "val_dataset": job.train.val_dataset})
    model = trainer.eval_model
    slim = next((h for h in trainer.hooks if isinstance(h, SlimHook)), None)
    if slim is not None:
        extra["slim"] = {"from_blocks": len(slim.names), "to_blocks": slim.target, "removed": slim.removed}
        model = compact_model(model, job.quant, slim.kept_indices())
    last = write_model_file(model, run_dir / "qat_last.safetensors", job.quant, extra)
    best = run_dir / "qat_best.safetensors"
    source = model
    if best.is_file() and slim is None:
        source = packing_io.load_model_file(best)
    out = job.out or run_dir / "model.safetensors"
    trainer.emit({"event": "phase", "phase": "packing", "message": str(out)})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_packed_file(source, out, job.quant, extra)
    summary = {"run_dir": str(run_dir), "qat_last": str(last), "qat_best": str(best) if best.is_file() else None,
               "out": str(out), "iters": trainer.iteration, "best_psnr": extra["best_psnr"],
               "best_iter": trainer.best_iter, "history": trainer.history[-20:]}
    try:
        write_json(run_dir / "summary.json", summary)
    except OSError as exc:
        raise ConfigError(f"cannot write ({exc.strerror or exc})", run_dir / "summary.json") from None
    return summary


def check_training_outputs(job: QuantizeJob, run_dir: Path) -> None:
    """Refuse the run before any work when a file it writes is one of its inputs or another of its results."""
    out = job.out or run_dir / "model.safetensors"
    check_model_output(out, "--out")
    inputs = []
    for source, label in ((job.start_model, "--model"), (job.init, "--init"), (job.train.distill, "teacher")):
        if source:
            try:
                inputs.append((resolve_model_path(source), label))
            except QuantSRError:
                inputs.append((Path(source), label))
    outputs = [(out, "--out")] + [(run_dir / name, name) for name in RUN_FILES]
    check_outputs(outputs, inputs)


def run_quantize(job: QuantizeJob, on_event: EventFn | None = None) -> dict[str, Any]:
    """Train ``job`` to the end (resuming if asked) and write its outputs; returns the summary.

    Before anything is loaded: the run folder must be a folder, no output may be an input or another
    output (:func:`check_training_outputs`), and the run folder is locked for this process
    (:class:`~quantsr_cli.engine.runlock.RunDirLock`; a live second writer is refused, a stale lock taken
    over). Temporary files of an earlier killed run are removed.
    """
    run_dir = job.run_dir or Path("runs") / job.run_name
    check_run_dir(run_dir)
    check_training_outputs(job, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_locked(job, on_event)  # under torchrun, rank 0 holds the lock and writes every file
    notice = (lambda message: on_event({"event": "log", "message": message})) if on_event else None
    with RunDirLock(run_dir, on_notice=notice):
        clean_temp_files(run_dir, run_dir / "checkpoints", job.out.parent if job.out else run_dir)
        return _run_locked(job, on_event)


def _run_locked(job: QuantizeJob, on_event: EventFn | None) -> dict[str, Any]:
    torch.manual_seed(job.train.seed)  # fresh weights (no --init) are part of the run's determinism
    if job.start_model is not None:
        model = load_start_model(job.start_model)
        job = replace(job, quant=extend_start_model(model, job.quant, on_event))
        if job.share_qv_quantizer and not model.hparams.get("share_qv_quantizer"):
            raise ConfigError(f"--model {job.start_model} quantizes attention v with its own quantizer; "
                              "share_qv_quantizer applies to a fresh model only")
    else:
        model = build_initial_model(job, on_event)
    if job.train.iters == 0:
        from quantsr_cli.engine.ptq import run_ptq  # PTQ reuses this module's writers

        return run_ptq(job, model, on_event)
    trainer = prepare_training(job, model, on_event)
    extra = json.loads(trainer.model_meta["extra"])

    def on_best(t: Trainer) -> None:
        if any(isinstance(h, SlimHook) for h in t.hooks):
            return  # the best slimmed model is only known once every removal is done
        write_model_file(t.eval_model, t.run_dir / "qat_best.safetensors", job.quant,
                         {**extra, "best_psnr": t.best_psnr, "best_iter": t.best_iter})

    trainer.train(on_best=on_best)
    if trainer.rank != 0:
        return {}
    return finish_training(job, trainer)

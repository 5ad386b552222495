"""``quantsr upscale``: super-resolve image files or folders with any model (packed by default).

Mirrors Real-ESRGAN's ``inference_realesrgan.py`` where it fits: inputs are files, folders or globs;
the output is a file for a single input and otherwise a folder (``<stem><suffix>.<ext>``), and no
output may replace an input or another output (checked for all of them before anything is written); large
images go through overlapping tiles; alpha is upscaled separately (bicubic, or by the model with
``alpha_upsampler="model"``), 16-bit PNGs stay 16-bit and grayscale stays grayscale; ``outscale`` resizes the
model's output to any final scale (Lanczos, as Real-ESRGAN's ``--outscale``). Every output is written atomically, so an interrupted run leaves only
complete files (plus, after ``kill -9``, at most a hidden ``.<name>.<pid>.<hex>.tmp`` file, which the
next run into that folder deletes), and ``skip_existing`` resumes it. One failing image does not stop
the others.
"""

from __future__ import annotations

import glob
import os

import cv2
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantsr_cli.data.imresize import imresize
from quantsr_cli.data.io import (
    _NO_ALPHA_FORMATS,
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    check_pixels,
    image_size,
    image_array,
    list_images,
    read_image,
    remove_stale_temp_files,
    write_array,
)
from quantsr_cli.engine.modelio import LoadedModel, resolve_model_path
from quantsr_cli.engine.outputs import check_outputs, resolved
from quantsr_cli.engine.tiling import upscale_tensor
from quantsr_cli.errors import ConfigError, ImageError, NumericError, QuantSRError

EventFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class UpscaleOptions:
    """Options of one upscale run (units: LR pixels for ``tile``/``tile_pad``)."""

    tile: int = 256
    tile_pad: int = 16
    suffix: str = ""
    ext: str = "auto"
    overwrite: bool = True
    max_pixels: int | None = MAX_PIXELS
    outscale: float | None = None
    """Final scale of the written image (None: the model's); the output is resized with Lanczos."""
    alpha_upsampler: str = "bicubic"
    """How an alpha channel is upscaled: ``bicubic`` (MATLAB-style) or ``model`` (the SR model, on gray)."""
    quality: int = 95
    """JPEG quality 0..100 / WebP quality 1..100 (100 = lossless WebP)."""

    def __post_init__(self) -> None:
        if self.outscale is not None and not (0.0 < self.outscale <= 16.0):
            raise ConfigError(f"--outscale {self.outscale} must be in (0, 16]")
        if self.alpha_upsampler not in ("bicubic", "model"):
            raise ConfigError(f"--alpha-upsampler {self.alpha_upsampler!r}; choose bicubic or model")
        if not 0 <= self.quality <= 100:
            raise ConfigError(f"--quality {self.quality} must be in 0..100")
        if self.tile < 0:
            raise ConfigError(f"--tile {self.tile} must be 0 (no tiling) or positive")
        if self.tile_pad < 0:
            raise ConfigError(f"--tile-pad {self.tile_pad} must not be negative")
        if self.max_pixels is not None and self.max_pixels < 0:
            raise ConfigError(f"--max-pixels {self.max_pixels} must be positive (0 = no limit)")
        if self.ext not in ("auto", "png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp"):
            raise ConfigError(f"--ext {self.ext!r}; choose auto, png, jpg, webp, tif or bmp")


@dataclass
class UpscaleReport:
    """What happened to each input: written outputs, skipped ones and failures (path -> message)."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": self.skipped, "failed": self.failed, "warnings": self.warnings}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns; a missing input is an error."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(list_images(path))
        elif path.exists():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).suffix.lower() in IMAGE_EXTENSIONS)
            if not matches:
                raise ImageError("pattern matches no image", item)
            files.extend(matches)
        else:
            raise ImageError("no such file or folder", item)
    if not files:
        raise ImageError("no images found in the given inputs", ", ".join(inputs))
    return files


def output_paths(files: list[Path], output: Path, opts: UpscaleOptions, single_target: bool) -> list[Path]:
    """Destination of each input. ``single_target``: ``output`` is a file (one input)."""
    if single_target:
        return [output]
    out = []
    for src in files:
        ext = src.suffix.lower().lstrip(".") if opts.ext == "auto" else opts.ext
        out.append(output / f"{src.stem}{opts.suffix}.{ext}")
    return out


def is_single_target(files: list[Path], out: Path) -> bool:
    """Whether ``-o`` names one output file (else a folder); ConfigError for names that cannot be meant.

    An existing folder, or a name without an extension, is a folder. A name with an image extension
    is a file, for exactly one input. Any other extension (``out.gif``, ``res.v2``) is refused rather
    than silently becoming a folder.
    """
    if out.is_dir():
        return False
    suffix = out.suffix.lower()
    if suffix and suffix not in IMAGE_EXTENSIONS:
        raise ConfigError(f"unknown image extension {suffix!r} for the output; name a file *.png, *.jpg, *.webp, "
                          "*.tif or *.bmp, or a folder without an extension", out)
    if suffix and len(files) > 1:
        raise ConfigError(f"names one image file but there are {len(files)} inputs; give a folder", out)
    if not suffix and out.exists():
        raise ConfigError("is a file, but the output of these inputs is a folder; give a folder", out)
    return bool(suffix)


def _unique(files: list[Path]) -> list[Path]:
    """``files`` without repeats of the same file (a folder and a glob may both name it)."""
    seen: set[Path] = set()
    out = []
    for f in files:
        key = resolved(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def upscale_image(loaded: LoadedModel, src: Path, dst: Path, opts: UpscaleOptions,
                  on_tile: Callable[[int, int], None] | None = None) -> list[str]:
    """Read ``src``, super-resolve it and write ``dst`` atomically; returns warnings (e.g. alpha dropped)."""
    scale = loaded.scale if opts.outscale is None else opts.outscale
    image = read_image(src, max_pixels=opts.max_pixels or None, scale=max(loaded.scale, int(-(-scale // 1))))
    rgb, lr_alpha, bit_depth, gray = image.rgb, image.alpha, image.bit_depth, image.gray
    h, w = int(rgb.shape[-2]), int(rgb.shape[-1])
    del image  # keep at most one copy of the input alive while the (large) output exists
    device = next(iter(loaded.model.parameters()), torch.empty(0)).device
    run = lambda x, cb: upscale_tensor(loaded.model, x.to(device), loaded.scale, tile=opts.tile,  # noqa: E731
                                       tile_pad=opts.tile_pad, on_tile=cb)
    try:
        sr = run(rgb, on_tile)
        del rgb
        alpha = None
        if lr_alpha is not None and opts.alpha_upsampler == "model":
            alpha = run(lr_alpha.expand(-1, 3, -1, -1), None).mean(dim=1, keepdim=True).cpu()
        elif lr_alpha is not None:
            alpha = imresize(lr_alpha, loaded.scale).clamp(0, 1)
    except NumericError as exc:
        raise NumericError(f"{exc} (model {loaded.source}); nothing written", src) from None
    warnings = []
    if lr_alpha is not None and dst.suffix.lower() in _NO_ALPHA_FORMATS:
        warnings.append(f"{src}: {dst.suffix.lstrip('.').upper()} has no alpha channel; the alpha of the input "
                        f"is dropped in {dst.name} (write .png, .webp or .tif to keep it)")
    arr = image_array(dst, sr.cpu(), alpha=alpha, bit_depth=bit_depth, gray=gray)
    del sr  # the float output canvas goes before the encoder's buffers come
    if opts.outscale is not None and opts.outscale != loaded.scale:
        size = (max(1, int(w * opts.outscale)), max(1, int(h * opts.outscale)))  # as Real-ESRGAN: floor
        arr = cv2.resize(arr, size, interpolation=cv2.INTER_LANCZOS4)
    write_array(dst, arr, jpeg_quality=opts.quality)
    return warnings


def _model_file(loaded: LoadedModel) -> list[tuple[Path, str]]:
    try:
        return [(resolve_model_path(loaded.source), "--model")]
    except QuantSRError:
        return []


@dataclass
class UpscalePlan:
    """What a run will do, decided before any model work: inputs, their outputs, and the inputs already
    refused from their headers (path -> message: too large, not an image)."""

    files: list[Path]
    targets: list[Path]
    single: bool
    out: Path
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def runnable(self) -> int:
        return len(self.files) - len(self.refused)


def plan_upscale(loaded: LoadedModel, inputs: list[str], output: str, opts: UpscaleOptions) -> UpscalePlan:
    """Expand the inputs, decide and check every output path (:func:`~quantsr_cli.engine.outputs.check_outputs`:
    no output may be an input -- image or model -- or another output) and read each input's size from its
    header (``--max-pixels`` on the input and on the output), all before a backend is prepared or anything
    is written. Raises for run-level problems; per-image refusals go to ``refused``."""
    files = _unique(collect_inputs(inputs))
    out = Path(output)
    single = is_single_target(files, out)
    targets = output_paths(files, out, opts, single)
    check_outputs([(dst, "output") for dst in targets],
                  [(src, "input image") for src in files] + _model_file(loaded))
    plan = UpscalePlan(files, targets, single, out)
    scale = max(loaded.scale, int(-(-(opts.outscale or loaded.scale) // 1)))
    for src in files:
        size = image_size(src)
        try:
            if size is not None:
                check_pixels(size[0], size[1], opts.max_pixels or None, src, scale)
        except QuantSRError as exc:
            plan.refused[str(src)] = str(exc)
    return plan


def run_upscale(
    loaded: LoadedModel,
    inputs: list[str],
    output: str,
    opts: UpscaleOptions,
    on_event: EventFn | None = None,
    plan: UpscalePlan | None = None,
) -> UpscaleReport:
    """Upscale every input (``plan`` from :func:`plan_upscale`, made now when None); returns a report
    (failures are collected, not raised). Nothing is written before every output path is checked."""
    plan = plan if plan is not None else plan_upscale(loaded, inputs, output, opts)
    files, targets, single, out = plan.files, plan.targets, plan.single, plan.out
    if not single:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageError(f"cannot create output folder: {exc.strerror}", out) from None
        if not os.access(out, os.W_OK):
            raise ImageError("output folder is not writable", out)
    elif not out.parent.exists() or not os.access(out.parent if str(out.parent) else Path("."), os.W_OK):
        raise ImageError("output folder does not exist or is not writable", out.parent)
    report = UpscaleReport()
    # temp files of an earlier run that was killed (kill -9, power loss) while writing these outputs
    remove_stale_temp_files(out.parent if single else out)
    for index, (src, dst) in enumerate(zip(files, targets)):
        try:
            if str(src) in plan.refused:
                report.failed[str(src)] = plan.refused[str(src)]
            elif dst.exists() and not opts.overwrite:
                report.skipped.append(str(dst))
            else:
                def on_tile(done: int, total: int, index: int = index, src: Path = src) -> None:
                    if on_event:
                        on_event({"event": "tile", "index": index, "total": len(files), "src": str(src),
                                  "tile": done, "tiles": total})

                report.warnings.extend(upscale_image(loaded, src, dst, opts, on_tile))
                report.written.append(str(dst))
        except QuantSRError as exc:
            report.failed[str(src)] = str(exc)
        except (OSError, RuntimeError, ValueError) as exc:
            report.failed[str(src)] = f"{src}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        if on_event:
            on_event({"event": "image", "index": index + 1, "total": len(files), "src": str(src), "dst": str(dst),
                      "failed": str(src) in report.failed})
    return report

"""Frozen configuration dataclasses shared by every layer, and the one declaration of each training option.

A field made with :func:`~quantsr_cli.options.option` is a training option: its preset/``--config`` key,
its flag on ``quantize``/``slim``/``distill`` (``commands``), its help and its bounds all come from that
field (see :mod:`quantsr_cli.options`). Precedence when the command line builds these: CLI flag >
``--config`` file > preset > the defaults below. The dataclasses only hold and validate values; reading
YAML is :mod:`quantsr_cli.presets`'s job.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from quantsr_cli.errors import ConfigError
from quantsr_cli.options import Declared, Option, check_fields, declared, describe, option

QUANT_BITS = (2, 4, 8)
"""Bit-widths a quantized weight or activation may take. 32 means full precision (no quantizer)."""

ACT_SIGN_RULES = ("min", "mse")
"""How learned-step activation quantizers pick signed/unsigned on their first batch (see ``QuantConfig``)."""

SCALES = (2, 3, 4)

FP_BITS = 32
"""The bit-width that means full precision (no quantizer)."""

MAX_LAYER_RULES = 256
"""Most per-layer bit rules a config may hold (each is matched against every module name)."""

LayerRule = tuple[str, int, int]
"""A per-layer bit rule: ``(fnmatch pattern over module names, w_bits, a_bits)``; 32 = full precision."""


def parse_layer_bits(value: object) -> tuple[LayerRule, ...]:
    """Per-layer bit rules from a ``layers:`` mapping ``{pattern: bits}`` (in order; a later rule wins).

    ``bits`` is ``fp`` (or 32): the layer stays full precision; 2, 4 or 8: weights and input activations
    at that width; or ``"w<b>a<b>"`` (e.g. ``w4a8``; activations may be 32) for separate widths. Patterns are
    ``fnmatch`` patterns over module names as ``quantsr info --layers`` lists them (``*`` also spans dots).
    Rules already parsed (a tuple of ``(pattern, w, a)``) are checked and returned as they are.

    Raises:
        ConfigError: not a mapping, an empty or over-long pattern, or a bit-width other than the above.
    """
    if isinstance(value, tuple) and all(isinstance(r, tuple) and len(r) == 3 for r in value):
        value = {p: f"w{w}a{a}" for p, w, a in value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"layers must map layer-name patterns to bits (e.g. {{conv_first: fp, 'body.*': 4}}), "
                          f"got {type(value).__name__}")
    if len(value) > MAX_LAYER_RULES:
        raise ConfigError(f"layers holds {len(value)} rules; at most {MAX_LAYER_RULES} are allowed")
    rules = []
    for pattern, bits in value.items():
        if not isinstance(pattern, str) or not pattern or len(pattern) > 200:
            raise ConfigError(f"layers: {str(pattern)[:40]!r} is not a layer-name pattern")
        rules.append((pattern, *_rule_bits(pattern, bits)))
    return tuple(rules)


def _rule_bits(pattern: str, bits: object) -> tuple[int, int]:
    allowed = QUANT_BITS + (FP_BITS,)
    pair: tuple[int, int] | None = None
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text in ("fp", "fp32", "float", "32"):
            return FP_BITS, FP_BITS
        found = re.fullmatch(r"w(\d+)a(\d+)", text) or re.fullmatch(r"(\d+)", text)
        pair = (int(found.group(1)), int(found.group(found.lastindex or 1))) if found else None
    elif isinstance(bits, int) and not isinstance(bits, bool):
        pair = (bits, bits)
    if pair is None or pair[0] not in allowed or pair[1] not in allowed or (pair[0] == FP_BITS != pair[1]):
        raise ConfigError(f"layers: {pattern!r}: {str(bits)[:20]!r} is not fp, 2, 4, 8 or w<b>a<b> "
                          "(e.g. w4a8; bits 2, 4 or 8, activations also 32)")
    return pair


def layer_bits_dict(rules: tuple[LayerRule, ...]) -> dict[str, str]:
    """The ``layers:`` mapping of ``rules`` (``fp``, or ``w<b>a<b>``), as a config file would write it."""
    return {p: "fp" if w == FP_BITS else f"w{w}a{a}" for p, w, a in rules}


@dataclass(frozen=True)
class ModelConfig:
    """The model a training run starts from: architecture, scale, pretrained weights, depth.

    ``arch`` has no default: a flag, ``--config`` file or preset must name it (or ``--model`` a file).
    ``help`` may name ``{archs}``: the command line fills in the registered architectures.
    """

    arch: str = option(help="Architecture: {archs} (else read from the init file, --model, --config or a preset).",
                       commands=("quantize", "slim"), short="-a", shown="none", panel="Model")
    scale: int = option(4, "Upscaling factor: 2, 3 or 4.", commands=("quantize",), short="-s", choices=SCALES,
                        panel="Model")
    init: str | None = option(None, "Full-precision pretrained weights (.pth/.pt/.ckpt/.safetensors): the "
                              "architecture and scale are detected from them.",
                              commands=("quantize", "slim"), shown="fresh initialisation", panel="Model")
    blocks: int | None = option(None, "Residual blocks (quantsr-c, srresnet) or RSTBs (swinir-s).",
                                commands=("quantize", "slim"), shown="the architecture's", panel="Model")
    share_qv_quantizer: bool = option(False, "swinir-s: quantize attention v with q's quantizer, as the released "
                                      "QuantSR code does (off: v has its own).", commands=("quantize",),
                                      panel="Model")

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"--scale {self.scale} is not supported; choose 2, 3 or 4")
        check_fields(self)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        method: a registered quantization method (``quantsr_cli.quant.METHODS``; this layer cannot
            import the registry, so an unknown name is refused where the method is used:
            ``quant.method_spec``, called by ``quantize_``, the engine's jobs and the file loaders).
        w_bits: weight bit-width, in :data:`QUANT_BITS`, or 32 for full precision.
        a_bits: activation bit-width, in :data:`QUANT_BITS`, or 32 for full precision.
        act_sign: how ``rbd``/``rlq``/``lsq`` activation quantizers choose their grid on the first
            batch: ``"min"`` (the released code: signed when the batch has any negative value) or
            ``"mse"`` (whichever of the signed/unsigned grids, at the LSQ initial step, has the lower
            mean squared error on that batch). Used only at initialisation; the choice is stored in
            each quantizer's ``signed`` buffer. Ignored by ``dorefa`` and ``pams``.
        layers: per-layer bit rules (:func:`parse_layer_bits`; a ``{pattern: bits}`` mapping is accepted
            and normalised): a layer a rule matches takes that rule's widths (the last matching rule
            wins), also when the architecture's rule keeps it full precision; ``fp`` keeps it full
            precision. Layers no rule matches follow the architecture's rule at ``w_bits``/``a_bits``.
    """

    method: str = option("rbd", "Quantizer: {methods}.", commands=("quantize",), panel="Quantization")
    w_bits: int = option(4, "Weight bits (overrides --bits).", commands=("quantize",), choices=QUANT_BITS + (32,),
                         allowed="2, 4 or 8 (32 = full precision)", panel="Quantization")
    a_bits: int = option(4, "Activation bits (overrides --bits).", commands=("quantize",),
                         choices=QUANT_BITS + (32,), allowed="2, 4 or 8 (32 = full precision)", panel="Quantization")
    act_sign: str = option("min", "Activation grid choice on the first batch: min (released code: signed if any "
                           "value < 0) or mse.", commands=("quantize",), choices=ACT_SIGN_RULES, panel="Quantization")
    layers: tuple[LayerRule, ...] = option((), "Per-layer bits by module-name pattern, in a preset or --config "
                                           "file: {pattern: fp | 2 | 4 | 8 | w<b>a<b>}, the last match wins.",
                                           commands=(), parse=parse_layer_bits, panel="Quantization")

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", self.method):
            raise ConfigError(f"method={self.method!r} is not a method name")
        if self.act_sign not in ACT_SIGN_RULES:
            raise ConfigError(f"act_sign={self.act_sign!r}; choose one of {', '.join(ACT_SIGN_RULES)}")
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits not in QUANT_BITS + (32,):
                raise ConfigError(f"{name}={bits} is not supported; choose 2, 4 or 8 (32 = full precision)")
        object.__setattr__(self, "layers", parse_layer_bits(self.layers))

    @property
    def full_precision(self) -> bool:
        """True when nothing is quantized: ``--bits 32`` and no per-layer rule quantizes a layer."""
        return self.w_bits == 32 and self.a_bits == 32 and all(w == a == FP_BITS for _, w, a in self.layers)

    def rule_for(self, name: str) -> LayerRule | None:
        """The last per-layer rule whose pattern matches module ``name``, or None."""
        for rule in reversed(self.layers):
            if fnmatchcase(name, rule[0]):
                return rule
        return None

    def bits_for(self, name: str) -> tuple[int, int]:
        """``(w_bits, a_bits)`` of module ``name`` when quantized: its rule's, else the config's."""
        rule = self.rule_for(name)
        return (rule[1], rule[2]) if rule is not None else (self.w_bits, self.a_bits)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits,
                                  "act_sign": self.act_sign}
        if self.layers:
            out["layers"] = layer_bits_dict(self.layers)
        return out


@dataclass(frozen=True)
class TrainConfig:
    """Options of the one training loop (``quantize``, ``slim``, ``distill``).

    Units: iterations are optimizer steps; ``patch_size`` is the HR patch side in pixels;
    ``lr`` is Adam's learning rate for every trainable parameter. ``drop_path_rate`` is the stochastic
    depth rate of models that have it (``swinir-s``: the official SwinIR rule, per-block rates rising
    linearly from 0 to it; the released QuantSR+-T trains with 0.1), used in training forwards only;
    0 = off.
    """

    iters: int = option(2000, "Training iterations (0 = post-training quantization: calibrate with bias "
                        "correction and pack, no training; needs --init).", ge=0)
    batch_size: int = option(16, "Patches per iteration.", ge=1)
    patch_size: int = option(192, "HR patch side in pixels (a multiple of the scale).", ge=8)
    lr: float = option(2e-4, "Adam learning rate.", gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    scheduler: str = option("cosine", "Learning-rate schedule: cosine, multistep or constant.", commands=(),
                            choices=("cosine", "multistep", "constant"))
    milestones: tuple[int, ...] = option((), "multistep: iterations at which the learning rate is multiplied by "
                                         "gamma.", commands=(), shown="none")
    gamma: float = option(0.5, "multistep: learning-rate factor at each milestone.", commands=())
    eta_min: float = 1e-7
    val_every: int = option(200, "Validate every N iterations (0 = never).", ge=0, hint="(0 = off/default)")
    save_every: int = option(100, "Write a resumable checkpoint every N iterations.", ge=1)
    log_every: int = option(10, "Write the loss, learning rate and it/s to train_log.jsonl every N iterations.",
                            ge=1)
    tensorboard: bool = option(False, "Also log them, and validation PSNR, to TensorBoard in <run-dir>/tensorboard "
                               "(needs the tensorboard package).")
    save_val_images: int = option(0, "At each validation, save the SR output of the first N validation images as "
                                  "<run-dir>/visualization/<dataset>/<image>_<iter>.png (0 = off).", ge=0, le=100,
                                  hint="(0 = off)")
    seed: int = option(0, "Random seed.")
    num_workers: int = 0
    threads: int = option(0, "Torch CPU threads (0 = torch default).", ge=0, hint="(0 = off/default)")
    train_data: tuple[str, ...] = option((), "HR image folder; repeatable.", shown="$QUANTSR_DATA/train/*")
    val_dataset: str = option("Set5", "Validation benchmark (name or folder).")
    val_max_images: int = option(0, "Validate on the first N images only (0 = all).", commands=(), ge=0,
                                 hint="(0 = off/default)")
    dqa: bool = option(False, "QuantSR depth-dynamic training (full, 1/2, 1/4 depth).", commands=("quantize",),
                       panel="QuantSR+")
    slim_to: int = option(0, "QSA: remove residual blocks during training until N remain (0 = off).",
                          commands=("quantize", "slim"), flags={"slim": "--target-blocks"}, required=("slim",),
                          ge=0, hint="(0 = off/default)", panel="QuantSR+")
    slim_start_ratio: float = option(0.2, "QSA: first block removal at this fraction of the iterations.",
                                     commands=("slim",), flags={"slim": "--start-ratio"}, ge=0, lt=1,
                                     panel="QuantSR+")
    distill: str = option("", "SFD: full-precision teacher model (.pth or safetensors) to distill features from.",
                          commands=("quantize", "distill"), flags={"distill": "--teacher"}, required=("distill",),
                          shown="off", panel="QuantSR+")
    feature_weight: float = option(1e-4, "SFD: weight of the feature loss.", commands=("quantize", "distill"), ge=0,
                                   panel="QuantSR+")
    bias_correction: bool = option(True, "Correct FP biases for the quantization error on the calibration batch.",
                                   commands=("quantize",))
    ema_decay: float = option(0.0, "Validate and write an EMA of the weights (BasicSR: 0.999; 0 = off).",
                              commands=("quantize",), ge=0, lt=1, hint="(0 = off; BasicSR uses 0.999)")
    drop_path_rate: float = option(0.0, "swinir-s stochastic depth during training (released QuantSR-T: 0.1, set by "
                                   "the swinir-s presets; 0 = off).", commands=("quantize",), ge=0, lt=1,
                                   hint="(0 = off; SwinIR uses 0.1)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not math.isfinite(self.eta_min):
            raise ConfigError(f"eta_min={self.eta_min!r} must be a finite number")
        if self.iters == 0:
            training_only = [n for n in ("dqa", "slim_to", "distill", "ema_decay") if getattr(self, n)]
            if training_only:
                raise ConfigError(f"iters=0 calibrates and packs without training; {', '.join(training_only)} "
                                  "needs training iterations")
        if self.ema_decay and self.slim_to:
            raise ConfigError("ema_decay cannot be combined with slim_to: QSA changes the model while it trains")


@functools.cache
def training_options() -> tuple[Declared, ...]:
    """Every training option in ``--help`` order: model, ``bits``, quantization, training.

    ``bits`` is the one alias: in a flag set or file it sets both ``w_bits`` and ``a_bits`` unless that same
    layer sets them itself.
    """
    bits = Option("Weight and activation bits: 2, 4 or 8 (32 = full precision).", commands=("quantize", "slim"),
                  short="-b", choices=QUANT_BITS + (32,), allowed="2, 4 or 8 (32 = full precision)",
                  panel="Quantization")
    return (*declared(ModelConfig), describe("bits", int, 4, bits, sets=("w_bits", "a_bits")),
            *declared(QuantConfig), *declared(TrainConfig))


@dataclass(frozen=True)
class ModelSpec:
    """An architecture name and its hyperparameters: enough to build the model alone.

    ``hparams`` holds the builder's keyword arguments (e.g. ``{"upscale": 4, "num_block": 16}``)
    and is stored verbatim in checkpoint metadata.
    """

    arch: str
    hparams: dict[str, object] = field(default_factory=dict)

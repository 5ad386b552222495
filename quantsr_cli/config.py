"""Frozen configuration dataclasses shared by every layer.

Precedence when the command line builds these: CLI flag > ``--config`` file > preset > the defaults
below. The dataclasses only hold and validate values; reading YAML is :mod:`quantsr_cli.presets`'s job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from quantsr_cli.errors import ConfigError

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
    at that width; or ``"w<b>a<b>"`` (e.g. ``w4a8``) for separate widths. Patterns are ``fnmatch`` patterns
    over module names as ``quantsr info --layers`` lists them (``*`` also spans dots).

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
    if isinstance(bits, str):
        text = bits.strip().lower()
        if text in ("fp", "fp32", "float", "32"):
            return FP_BITS, FP_BITS
        found = re.fullmatch(r"w(\d+)a(\d+)", text) or re.fullmatch(r"(\d+)", text)
        pair = (int(found.group(1)), int(found.group(found.lastindex or 1))) if found else None
    elif isinstance(bits, int) and not isinstance(bits, bool):
        pair = (bits, bits)
    else:
        pair = None
    if pair is None or pair[0] not in allowed or pair[1] not in allowed or (pair[0] == FP_BITS != pair[1]):
        raise ConfigError(f"layers: {pattern!r}: {str(bits)[:20]!r} is not fp, 2, 4, 8 or w<b>a<b> "
                          "(e.g. w4a8; bits 2, 4 or 8, activations also 32)")
    return pair


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

    method: str = "rbd"
    w_bits: int = 4
    a_bits: int = 4
    act_sign: str = "min"
    layers: tuple[LayerRule, ...] = ()

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


def layer_bits_dict(rules: tuple[LayerRule, ...]) -> dict[str, str]:
    """The ``layers:`` mapping of ``rules`` (``fp``, or ``w<b>a<b>``), as a config file would write it."""
    return {p: "fp" if w == FP_BITS else f"w{w}a{a}" for p, w, a in rules}


@dataclass(frozen=True)
class TrainConfig:
    """Options of the one training loop (``quantize``, ``slim``, ``distill``).

    Units: iterations are optimizer steps; ``patch_size`` is the HR patch side in pixels;
    ``lr`` is Adam's learning rate for every trainable parameter. ``drop_path_rate`` is the stochastic
    depth rate of models that have it (``swinir-s``: the official SwinIR rule, per-block rates rising
    linearly from 0 to it; the released QuantSR+-T trains with 0.1), used in training forwards only;
    0 = off.
    """

    iters: int = 2000
    batch_size: int = 16
    patch_size: int = 192
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    scheduler: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.5
    eta_min: float = 1e-7
    val_every: int = 200
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    threads: int = 0
    train_data: tuple[str, ...] = ()
    val_dataset: str = "Set5"
    val_max_images: int = 0
    dqa: bool = False
    slim_to: int = 0
    slim_start_ratio: float = 0.2
    distill: str = ""
    feature_weight: float = 1e-4
    bias_correction: bool = True
    ema_decay: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("lr", "gamma", "eta_min", "slim_start_ratio", "feature_weight", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name}={value!r} must be a finite number")
        if self.iters < 0:
            raise ConfigError(f"iters={self.iters} must not be negative (0 = calibrate and pack only, no training)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be at least 1")
        if self.patch_size < 8:
            raise ConfigError(f"patch_size={self.patch_size} must be at least 8")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.scheduler not in ("cosine", "multistep", "constant"):
            raise ConfigError(f"scheduler={self.scheduler!r}; choose cosine, multistep or constant")
        if not 0.0 <= self.slim_start_ratio < 1.0:
            raise ConfigError(f"slim_start_ratio={self.slim_start_ratio} must be in [0, 1)")
        for name in ("save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("val_every", "threads", "val_max_images", "slim_to"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative (0 = off/default)")
        if self.feature_weight < 0:
            raise ConfigError(f"feature_weight={self.feature_weight} must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must be in [0, 1) (0 = off; BasicSR uses 0.999)")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1) (0 = off; SwinIR uses 0.1)")
        if self.iters == 0:
            training_only = [n for n in ("dqa", "slim_to", "distill", "ema_decay") if getattr(self, n)]
            if training_only:
                raise ConfigError(f"iters=0 calibrates and packs without training; {', '.join(training_only)} "
                                  "needs training iterations")
        if self.ema_decay and self.slim_to:
            raise ConfigError("ema_decay cannot be combined with slim_to: QSA changes the model while it trains")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture name and its hyperparameters: enough to build the model alone.

    ``hparams`` holds the builder's keyword arguments (e.g. ``{"upscale": 4, "num_block": 16}``)
    and is stored verbatim in checkpoint metadata.
    """

    arch: str
    hparams: dict[str, object] = field(default_factory=dict)

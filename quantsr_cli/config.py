"""Frozen configuration dataclasses shared by every layer.

Precedence when the command line builds these: CLI flag > ``--config`` file > preset > the defaults
below. The dataclasses only hold and validate values; reading YAML is :mod:`quantsr_cli.presets`'s job.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from quantsr_cli.errors import ConfigError

QUANT_BITS = (2, 4, 8)
"""Bit-widths a quantized weight or activation may take. 32 means full precision (no quantizer)."""

ACT_SIGN_RULES = ("min", "mse")
"""How learned-step activation quantizers pick signed/unsigned on their first batch (see ``QuantConfig``)."""

SCALES = (2, 3, 4)


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
    """

    method: str = "rbd"
    w_bits: int = 4
    a_bits: int = 4
    act_sign: str = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", self.method):
            raise ConfigError(f"method={self.method!r} is not a method name")
        if self.act_sign not in ACT_SIGN_RULES:
            raise ConfigError(f"act_sign={self.act_sign!r}; choose one of {', '.join(ACT_SIGN_RULES)}")
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if bits not in QUANT_BITS + (32,):
                raise ConfigError(f"{name}={bits} is not supported; choose 2, 4 or 8 (32 = full precision)")

    @property
    def full_precision(self) -> bool:
        """True when neither weights nor activations are quantized (``--bits 32``)."""
        return self.w_bits == 32 and self.a_bits == 32

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits, "act_sign": self.act_sign}


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
        if self.iters < 1:
            raise ConfigError(f"iters={self.iters} must be at least 1")
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

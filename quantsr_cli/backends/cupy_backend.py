"""CuPy backend: packed conv/linear layers run on CUDA through the RawKernels in ``kernels/*.cu``.

The only module that imports cupy, and only inside functions (``import quantsr_cli`` never needs it).
Per layer call ``impl(module, x)``:

1. ``qsr_quantize_act``: ``x`` (float32, any strides) -> activation codes ``(N, H, W, C)``, one byte each
   (the layer's input quantizer ``clamp(round((x + a_shift) / a_step), a_qmin, a_qmax)``);
2. ``qsr_conv_{mma|dp4a}_w{2|4}_{s8|u8}``: integer implicit GEMM on the packed weight rows, epilogue
   ``y = acc * w_scale * a_step + bias`` written as float32 channels-last; the result is returned as the
   NCHW view ``(N, O, HO, WO)`` of that memory (``(..., O)`` for linear layers).

Non-packed layers stay torch: tensors pass torch -> cupy through DLPack (no copy) and every kernel is
launched on torch's current CUDA stream. Kernels are compiled with ``cupy.RawModule`` (NVRTC) on first
use, once per device (CuPy also keeps its on-disk cache). ``QUANTSR_CUPY_KERNEL=dp4a|mma`` forces a
path (default: tensor-core ``mma`` on sm_80+, ``dp4a`` below; CUDA 13's NVRTC starts at sm_75). Layers the kernels do not
cover (8-bit weights, ``a_bits == 32``, stride/dilation/groups != 1, activation points) keep the torch
reference forward on the same device. The fused epilogue (ReLU, residual, next-layer codes) is exposed
through :func:`run_packed` for callers that fuse layers; ``impl`` uses plain layer semantics.
"""

from __future__ import annotations

import functools
import importlib
import importlib.resources
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantsr_cli.backends import cupy_plan as plan
from quantsr_cli.errors import BackendUnavailableError
from quantsr_cli.packing.modules import tensor_key

KERNEL_FILES = ("qsr_quant_act.cu", "qsr_packed_gemm.cu")
INSTALL_HINT = "cupy is not installed (pip install quantsr[gpu])"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_STATE_ATTR = "_quantsr_cupy_state"


def kernel_source_dir() -> Path:
    """Folder holding ``kernels/*.cu``: ``quantsr_cli/kernels`` in an installed wheel (package data),
    else the repository's top-level ``kernels/`` (source checkout)."""
    try:  # a regular or namespace package; joinpath of either gives a real file path when installed
        first = importlib.resources.files("quantsr_cli.kernels").joinpath(KERNEL_FILES[0])
        if first.is_file():
            return Path(str(first)).parent
    except (ModuleNotFoundError, TypeError, ValueError, OSError):
        pass
    candidate = Path(__file__).resolve().parents[2] / "kernels"
    if (candidate / KERNEL_FILES[0]).is_file():
        return candidate
    raise BackendUnavailableError("CUDA kernel sources (kernels/*.cu) are missing from this installation")


def kernel_source(name: str) -> str:
    """Source of ``kernels/<name>`` with its ``#include "x.cuh"`` lines inlined (so NVRTC needs no
    include path and CuPy's compile cache keys on the full text)."""
    root = kernel_source_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        path = root / fname
        if not path.is_file():
            raise BackendUnavailableError(f"kernel source {fname} not found", root)
        if fname in seen:
            return ""
        seen.add(fname)
        text = path.read_text(encoding="utf-8")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def check_available() -> None:
    """Raise :class:`BackendUnavailableError` naming everything missing: a CUDA device and/or cupy."""
    problems = []
    if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
        problems.append("no CUDA device (torch.cuda.is_available() is False)")
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        problems.append(INSTALL_HINT)
    except Exception as exc:  # noqa: BLE001 - a broken cupy install raises anything
        problems.append(f"cupy cannot be imported ({type(exc).__name__}: {exc})")
    else:
        if not problems:
            try:
                if cupy.cuda.runtime.getDeviceCount() < 1:
                    problems.append("no CUDA device visible to cupy")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"cupy cannot use the GPU ({exc})")
    if problems:
        raise BackendUnavailableError("cupy backend unavailable: " + "; ".join(problems))


def _cupy() -> Any:
    _check_once()
    return importlib.import_module("cupy")


@functools.lru_cache(maxsize=1)
def _check_once() -> None:
    check_available()  # an exception is not cached: a later call checks again


# ----------------------------------------------------------------------------------------------------
# Per-layer state (host metadata + device copies), kept in the packed module's cache
# ----------------------------------------------------------------------------------------------------


@dataclass
class LayerState:
    """What the kernels need from one packed layer; ``unsupported`` names why it falls back."""

    unsupported: str | None
    kind: str = ""
    w_bits: int = 0
    zero2: int = 0
    a_signed: bool = False
    a_qmin: int = 0
    a_qmax: int = 0
    a_step: float = 1.0
    per_channel: bool = False
    in_ch: int = 0
    out_ch: int = 0
    kernel_size: Any = 1
    padding: Any = 0
    tensors: dict[str, dict[str, torch.Tensor | None]] | None = None


def _build_state(module: Any) -> LayerState:
    if not hasattr(module, "qweight"):
        return LayerState("not a packed weight layer")
    try:
        if int(module.a_bits) >= 32:
            raise ValueError("activations are not quantized (a_bits=32)")
        w_bits = int(module.w_bits)
        zero2 = plan.zero2_of(float(module.w_zero), w_bits)
        signed = plan.act_signed(int(module.a_qmin), int(module.a_qmax))
        conv = hasattr(module, "kernel_size")
        if conv:
            for attr, want in (("stride", 1), ("dilation", 1)):
                if plan.pair(getattr(module, attr, want)) != (1, 1):
                    raise ValueError(f"{attr}={getattr(module, attr)} (kernels need 1)")
            if int(getattr(module, "groups", 1)) != 1:
                raise ValueError(f"groups={module.groups} (kernels need 1)")
            plan.conv_geometry(1, 64, 64, int(module.in_channels), int(module.out_channels),
                               module.kernel_size, module.padding)
        in_ch = int(module.in_channels if conv else module.in_features)
        out_ch = int(module.out_channels if conv else module.out_features)
    except (ValueError, AttributeError, TypeError) as exc:
        return LayerState(str(exc))
    return LayerState(
        None, "conv" if conv else "linear", w_bits, zero2, signed, int(module.a_qmin), int(module.a_qmax),
        float(module.a_step.reshape(-1)[0].item()), module.w_scale.numel() > 1, in_ch, out_ch,
        getattr(module, "kernel_size", 1), getattr(module, "padding", 0), {},
    )


def _state(module: Any) -> LayerState:
    bufs = [getattr(module, n, None) for n in ("qweight", "w_scale", "bias", "a_step", "a_shift")]
    key = tensor_key(*bufs)
    cached = getattr(module, "cached", None)
    if callable(cached):
        return cached("cupy", key, lambda: _build_state(module))
    hit = module.__dict__.get(_STATE_ATTR)
    if hit is None or hit[0] != key:
        hit = (key, _build_state(module))
        module.__dict__[_STATE_ATTR] = hit
    return hit[1]


def _device_tensors(module: Any, st: LayerState, device: torch.device) -> dict[str, torch.Tensor | None]:
    assert st.tensors is not None
    t = st.tensors.get(str(device))
    if t is None:
        def dev(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if x is None else x.detach().to(device=device, dtype=dtype).contiguous()

        t = {"qweight": dev(module.qweight, torch.uint8), "w_scale": dev(module.w_scale, torch.float32),
             "bias": dev(module.bias, torch.float32), "shift": dev(module.a_shift, torch.float32)}
        st.tensors[str(device)] = t
    return t


def prepare(module: Any) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """Backend hook (see :mod:`quantsr_cli.backends`): validate ``module`` for the kernels, cache its
    metadata (device copies follow on the first call) and return :func:`impl`. Layers the kernels do
    not cover are noted in ``module.backend_note`` and run the torch reference inside :func:`impl`."""
    st = _state(module)
    note = "cupy kernels" if st.unsupported is None else f"torch reference on the GPU ({st.unsupported})"
    try:
        module.backend_note = note
    except (AttributeError, TypeError):
        pass
    return impl


def prepare_model(model: Any) -> None:
    """Fail early, before any layer is touched, when CUDA or cupy is missing; then install the engine as
    the model's forward (fused plan or layer by layer, CUDA graph per input shape; see
    :mod:`engine_runtime`). Float precision: the model's ``quantsr_engine_precision`` attribute (set by
    ``upscale --half``), else ``$QUANTSR_ENGINE_PRECISION`` (mixed, the default; fp16; fp32)."""
    check_available()
    from quantsr_cli.backends import engine_runtime

    engine_runtime.uninstall(model)
    precision = getattr(model, "quantsr_engine_precision", None) or os.environ.get("QUANTSR_ENGINE_PRECISION", "")
    engine_runtime.install(model, precision.strip().lower() or "mixed")


def release_model(model: Any) -> None:
    """Give the model its own forward back."""
    from quantsr_cli.backends import engine_runtime

    engine_runtime.uninstall(model)


def unavailable_reason() -> str | None:
    """None when this backend can run here, else the message of :func:`check_available`."""
    try:
        check_available()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def supported_reason(module: Any) -> str | None:
    """None when the cupy kernels run ``module``, else why it keeps the torch reference."""
    return _state(module).unsupported


# ----------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------


def kernel_path(device: torch.device) -> str:
    """``mma`` (sm_80+) or ``dp4a`` (sm_61+), or ``$QUANTSR_CUPY_KERNEL``."""
    forced = os.environ.get("QUANTSR_CUPY_KERNEL", "").strip().lower()
    if forced:
        if forced not in plan.PATHS:
            raise BackendUnavailableError(f"QUANTSR_CUPY_KERNEL={forced!r}; choose mma or dp4a")
        return forced
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return "mma"
    if (major, minor) >= (6, 1):
        return "dp4a"
    raise BackendUnavailableError(f"GPU sm_{major}{minor} has no int8 dot product (needs sm_61 or newer)")


def compile_options(file: str, kernel: str) -> tuple[str, ...]:
    """NVRTC options for ``kernel``: the GEMM file is compiled one entry at a time (``QSR_SELECT``)."""
    if file == KERNEL_FILES[1]:
        return ("--std=c++17", "-DQSR_SELECT", f"-DQSR_WANT_{kernel}")
    return ("--std=c++17",)


@functools.lru_cache(maxsize=None)
def _function(file: str, kernel: str, device_index: int) -> Any:
    """The compiled kernel (NVRTC on first use, then CuPy's on-disk cache), per device."""
    cp = _cupy()
    with cp.cuda.Device(device_index):
        try:
            module = cp.RawModule(code=kernel_source(file), options=compile_options(file, kernel))
            return module.get_function(kernel)
        except Exception as exc:  # noqa: BLE001 - CompileException, NVRTC/driver errors
            head = "\n".join(str(exc).splitlines()[:12])
            raise BackendUnavailableError(f"cannot compile/load CUDA kernel {kernel} from {file}: {head}") from exc


def launch(launch_plan: plan.Launch, device: torch.device) -> None:
    """Run a :class:`cupy_plan.Launch` whose buffers are CUDA torch tensors, on torch's current stream
    (:func:`engine_runtime.launch`; tests substitute this name to run the same code in the CPU shim)."""
    from quantsr_cli.backends import engine_runtime

    engine_runtime.launch(launch_plan, device)


def quantize_codes(x: torch.Tensor, strides: tuple[int, int, int, int], dims: tuple[int, int, int, int],
                   step: float, qmin: int, qmax: int, shift: torch.Tensor | None) -> torch.Tensor:
    """Codes ``(N, H, W, C)`` (int8 if ``qmin < 0`` else uint8) of ``x`` seen as ``(N, C, H, W)`` through
    element ``strides``."""
    n, c, h, w = dims
    signed = plan.act_signed(qmin, qmax)
    codes = torch.empty((n, h, w, c), dtype=torch.int8 if signed else torch.uint8, device=x.device)
    launch(plan.plan_quantize(x, codes, shift, n=n, c=c, h=h, w=w, strides=strides, step=step,
                              qmin=qmin, qmax=qmax), x.device)
    return codes


def run_packed(module: Any, codes: torch.Tensor, geom: plan.GemmGeometry, *, relu: bool = False,
               residual: torch.Tensor | None = None, out_float: bool = True,
               next_act: tuple[float, int, int, torch.Tensor | None] | None = None,
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The packed GEMM of ``module`` on input ``codes`` ``(N, H, W, C)``.

    Returns ``(y, next_codes)``: ``y`` float32 ``(N, HO, WO, O)`` (if ``out_float``) and the next
    layer's codes for ``next_act = (step, qmin, qmax, shift or None)`` (if given). ``residual`` is a
    float32 ``(N, HO, WO, O)`` tensor added after the optional ReLU.
    """
    st = _state(module)
    if st.unsupported:
        raise BackendUnavailableError(f"cupy kernels cannot run this layer: {st.unsupported}")
    dev = codes.device
    t = _device_tensors(module, st, dev)
    out_shape = (geom.n, geom.ho, geom.wo, geom.o)
    y = torch.empty(out_shape, dtype=torch.float32, device=dev) if out_float else None
    nxt = None
    kwargs: dict[str, Any] = {}
    if next_act is not None:
        step, qmin, qmax, shift = next_act
        nxt = torch.empty(out_shape, dtype=torch.int8 if plan.act_signed(qmin, qmax) else torch.uint8, device=dev)
        kwargs = {"y_codes": nxt, "next_step": step, "next_qmin": qmin, "next_qmax": qmax,
                  "next_shift": None if shift is None else shift.to(dev, torch.float32).contiguous()}
    res = None if residual is None else residual.to(dev, torch.float32).contiguous()
    launch(plan.plan_gemm(codes, t["qweight"], t["w_scale"], geom=geom, w_bits=st.w_bits, zero2=st.zero2,
                          a_signed=st.a_signed, a_step=st.a_step, per_channel=st.per_channel,
                          path=kernel_path(dev), bias=t["bias"], relu=relu, residual=res, y=y, **kwargs), dev)
    return y, nxt


def impl(module: Any, x: torch.Tensor) -> torch.Tensor:
    """Forward of a packed layer on the GPU kernels (``module.impl`` under ``--backend cupy``): the engine's
    tensor-core kernel where it applies (sm_80+, 1x1/3x3, channels multiples of 16), else the per-layer
    kernels, else the torch reference."""
    st = _state(module)
    if st.unsupported:
        return module.reference(x)
    if not x.is_cuda:
        raise BackendUnavailableError(f"cupy backend got an input on {x.device}; move model and input to CUDA")
    if engine_layer_supported(module, x.device):
        return engine_forward(module, x)
    return forward(module, x)


def engine_layer_supported(module: Any, device: torch.device) -> bool:
    """True when ``qsr_conv_tc`` runs this layer on ``device`` (tensor cores: sm_80+, not forced to dp4a)."""
    from quantsr_cli.backends.engine_layers import tc_unsupported
    from quantsr_cli.backends.engine_runtime import engine_disabled

    return kernel_path(device) == "mma" and engine_disabled() is None and tc_unsupported(module) is None


_LAYER_OPS: list[Any] = []


def _layer_ops() -> Any:
    """The engine ops of the layer-by-layer path (launches through this module's :func:`launch`)."""
    if not _LAYER_OPS:
        from quantsr_cli.backends import engine_runtime
        from quantsr_cli.backends.engine_layers import EngineOps

        _LAYER_OPS.append(EngineOps(lambda lp, dev: launch(lp, dev), engine_runtime.max_ctas, engine_runtime.Tuner()))
    return _LAYER_OPS[0]


def engine_forward(module: Any, x: torch.Tensor, ops: Any = None) -> torch.Tensor:
    """One packed layer through the engine kernel (float32 output), device-agnostic given ``ops``."""
    from quantsr_cli.backends.engine_plans import tc_layer_forward

    def quant_codes(t: torch.Tensor, strides: tuple[int, ...], dims: tuple[int, int, int, int], act: Any) -> torch.Tensor:
        return quantize_codes(t, strides, dims, act.step, act.qmin, act.qmax, act.shift)  # type: ignore[arg-type]

    return tc_layer_forward(ops or _layer_ops(), quant_codes, module, x)


def forward(module: Any, x: torch.Tensor) -> torch.Tensor:
    """The kernel path of :func:`impl` for a supported layer, device-agnostic: every kernel runs through
    :func:`launch` (the CPU-shim tests substitute it to run this exact code without a GPU)."""
    st = _state(module)
    x = x.detach().float()
    t = _device_tensors(module, st, x.device)
    if st.kind == "conv":
        n, c, h, w = x.shape
        geom = plan.conv_geometry(n, h, w, c, st.out_ch, st.kernel_size, st.padding)
        strides = tuple(int(s) for s in x.stride())
    else:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        n, c = x.shape
        h = w = 1
        if n == 0:
            return x.new_zeros((*lead, st.out_ch))
        geom = plan.linear_geometry(n, c, st.out_ch)
        strides = (int(x.stride(0)), int(x.stride(1)), 0, 0)
    if c != st.in_ch:
        raise ValueError(f"packed layer expects {st.in_ch} input channels, got {c}")
    codes = quantize_codes(x, strides, (n, c, h, w), st.a_step, st.a_qmin, st.a_qmax, t["shift"])
    y, _ = run_packed(module, codes, geom)
    assert y is not None
    if st.kind == "conv":
        return y.permute(0, 3, 1, 2)
    return y.reshape(*lead, st.out_ch)

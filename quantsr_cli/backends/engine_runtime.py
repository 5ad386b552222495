"""The engine on a CUDA device: NVRTC specialisations, launches on torch's stream, persistent grid sizes,
kernel tuning and whole-forward CUDA graphs. Imports cupy lazily (``backends`` is its only user).

* :func:`launch` runs any :class:`~cupy_plan.Launch` (legacy per-layer kernels and engine kernels alike) on
  torch's current stream; engine kernels are compiled per specialisation (``Launch.defines``) and cached.
* :class:`Tuner` times a handful of ``qsr_conv_tc`` tile shapes per layer shape on the real device the first
  time that shape runs and keeps the fastest (``QUANTSR_ENGINE_TUNE=0`` keeps the default shape).
* :class:`EngineRunner` replaces a packed model's ``forward`` under ``--backend cupy``: a fused plan
  (:mod:`engine_plans`) when the architecture has one, else the model's own forward with every supported
  packed layer on ``qsr_conv_tc``; each input shape is captured once as a CUDA graph and replayed.

Self-check: the first time a runner meets a device it runs one small input through the engine and through
the torch reference; if the engine fails, or its output is not within ``SELF_CHECK_DB`` of the reference,
the engine is switched off in this process (``engine_disabled()``) with a warning, and the model runs on the
per-layer kernels instead. ``QUANTSR_ENGINE=0`` switches it off from the start.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import statistics
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from quantsr_cli.backends import cupy_plan as plan
from quantsr_cli.backends import engine_plan as ep
from quantsr_cli.backends.engine_layers import EngineOps, TcLayer, default_spec
from quantsr_cli.backends.engine_plans import PRECISIONS, build_plan
from quantsr_cli.errors import BackendUnavailableError
from quantsr_cli.packing.modules import PackedModule, reference_forward

ENGINE_FILES = (("qsr_conv_tc", "qsr_conv_tc.cu"), ("qsr_quant_nhwc_", "qsr_engine_ops.cu"),
                ("qsr_channel_stats_", "qsr_engine_ops.cu"))
SELF_CHECK_DB = 30.0
"""Minimum PSNR (dB, output peak 1) of the engine against the torch reference on the self-check input."""
_DISABLED: list[str] = []
GRAPH_CACHE = 4
"""CUDA graphs kept per model (one per input shape, least recently used dropped first)."""


def _cupy() -> Any:
    from quantsr_cli.backends import cupy_backend

    cupy_backend._check_once()
    return importlib.import_module("cupy")


def engine_disabled() -> str | None:
    """Why the engine is off in this process (``QUANTSR_ENGINE=0`` or a failed self-check), else None."""
    if os.environ.get("QUANTSR_ENGINE", "1").strip() == "0":
        return "QUANTSR_ENGINE=0"
    return _DISABLED[0] if _DISABLED else None


def engine_file(kernel: str) -> str | None:
    for prefix, file in ENGINE_FILES:
        if kernel.startswith(prefix):
            return file
    return None


@functools.lru_cache(maxsize=None)
def _engine_kernel(kernel: str, defines: tuple[str, ...], device_index: int, smem: int) -> Any:
    """The compiled engine kernel (NVRTC on first use; CuPy also keeps its on-disk cache)."""
    from quantsr_cli.backends.cupy_backend import kernel_source

    cp = _cupy()
    file = engine_file(kernel)
    assert file is not None
    with cp.cuda.Device(device_index):
        try:
            fn = cp.RawKernel(kernel_source(file), kernel, options=("--std=c++17", *(f"-D{d}" for d in defines)))
            if smem > 48 * 1024:
                fn.max_dynamic_shared_size_bytes = smem
            fn.attributes  # noqa: B018 - compiles and loads now, not inside a CUDA-graph capture
        except Exception as exc:  # noqa: BLE001 - CompileException, NVRTC/driver errors
            head = "\n".join(str(exc).splitlines()[:12])
            raise BackendUnavailableError(f"cannot compile/load CUDA kernel {kernel} from {file}: {head}") from exc
    return fn


@functools.lru_cache(maxsize=None)
def _placeholder(device_index: int) -> torch.Tensor:
    return torch.zeros(4, dtype=torch.float32, device=torch.device("cuda", device_index))


_STREAMS: dict[tuple[int, int], Any] = {}


def _cupy_stream(cp: Any, stream: torch.cuda.Stream, index: int) -> Any:
    """CuPy view of torch's stream (``Stream.from_external`` on CuPy >= 14, else ``ExternalStream``)."""
    key = (index, int(stream.cuda_stream))
    hit = _STREAMS.get(key)
    if hit is None:
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(stream, "__cuda_stream__"):
            hit = from_external(stream)
        else:
            hit = cp.cuda.ExternalStream(stream.cuda_stream, index)
        _STREAMS[key] = hit
    return hit


def launch(lp: plan.Launch, device: torch.device) -> None:
    """Run ``lp`` (buffers: CUDA torch tensors) on torch's current stream of ``device``."""
    from quantsr_cli.backends import cupy_backend

    cp = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if engine_file(lp.kernel) is not None:
        fn = _engine_kernel(lp.kernel, lp.defines, index, lp.smem)
    else:
        file = cupy_backend.KERNEL_FILES[0] if lp.kernel == "qsr_quantize_act" else cupy_backend.KERNEL_FILES[1]
        fn = cupy_backend._function(file, lp.kernel, index)
    with cp.cuda.Device(index), _cupy_stream(cp, torch.cuda.current_stream(device), index):
        args = []
        for kind, value in lp.args:
            if kind == "P":
                args.append(cp.from_dlpack((_placeholder(index) if value is None else value).detach()))
            elif kind == "i":
                args.append(np.int32(value))
            else:
                args.append(np.float32(value))
        if lp.smem:
            fn(lp.grid, lp.block, tuple(args), shared_mem=lp.smem)
        else:
            fn(lp.grid, lp.block, tuple(args))


@functools.lru_cache(maxsize=None)
def _sm_limits(device_index: int) -> tuple[int, int, int]:
    """(multiprocessors, shared memory per multiprocessor, registers per multiprocessor)."""
    cp = _cupy()
    attrs = cp.cuda.Device(device_index).attributes
    return (int(attrs["MultiProcessorCount"]), int(attrs.get("MaxSharedMemoryPerMultiprocessor", 228 * 1024)),
            int(attrs.get("MaxRegistersPerMultiprocessor", 65536)))


def max_ctas(spec: ep.TcSpec, device: torch.device) -> int:
    """Persistent grid size of ``spec``: resident CTAs per multiprocessor (registers, shared memory,
    threads) times the multiprocessors (cached: no driver query inside a CUDA-graph capture)."""
    return _max_ctas(spec, device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_ctas(spec: ep.TcSpec, index: int) -> int:
    fn = _engine_kernel(spec.name, spec.defines, index, spec.smem_bytes())
    sms, smem_sm, regs_sm = _sm_limits(index)
    regs = int(fn.attributes.get("num_regs", 128))
    warp_regs = -(-regs * 32 // 256) * 256
    per_sm = min(regs_sm // max(1, warp_regs * spec.warps), smem_sm // (spec.smem_bytes() + 1024),
                 2048 // spec.threads, 32)
    return max(1, per_sm) * sms


def candidates(layer: TcLayer, yf32: bool) -> list[ep.TcSpec]:
    """Tile shapes tried by :class:`Tuner` (those that fit in shared memory)."""
    base = default_spec(layer, 1, 1, 1, yf32)
    shapes = [(4, 4), (8, 2), (4, 2), (8, 4), (2, 4)] if layer.ks == 3 else [(4, 2), (4, 4), (8, 2), (2, 2), (8, 4)]
    out = []
    for warps, wm in shapes:
        spec = ep.TcSpec(base.c, base.ks, base.ot, warps, base.a_signed, yf32=yf32, wm=wm)
        if spec.smem_bytes() <= 200 * 1024:
            out.append(spec)
    return out


class Tuner:
    """Picks the fastest ``qsr_conv_tc`` tile shape per (layer shape, pixel-count bucket), timed on the device;
    a shape whose output is not bit-identical to the default shape's is rejected, not timed."""

    def __init__(self) -> None:
        self.choice: dict[tuple[Any, ...], ep.TcSpec] = {}
        self.timings: dict[tuple[Any, ...], dict[str, float]] = {}
        self.rejected: list[str] = []
        """Tile shapes whose output differed from the default shape's (never chosen)."""

    def __call__(self, layer: TcLayer, n: int, h: int, w: int, yf32: bool) -> ep.TcSpec:
        m = n * h * w
        key = (layer.c, layer.ks, layer.o, layer.act.signed, yf32, int(np.log2(max(m, 1)) + 0.5))
        hit = self.choice.get(key)
        if hit is not None:
            return hit
        if os.environ.get("QUANTSR_ENGINE_TUNE", "1") == "0" or torch.cuda.is_current_stream_capturing():
            return default_spec(layer, n, h, w, yf32)
        dev = layer.wq.device
        codes = torch.randint(0, 4, (m, layer.c), dtype=torch.uint8, device=dev)
        y = torch.empty((m, layer.o), dtype=torch.float32 if yf32 else torch.float16, device=dev)
        epi = ep.Epilogue(layer.scale, layer.bias, yf=y, yf_ld=layer.o, yf_c1=layer.o)
        times: dict[str, float] = {}
        first: torch.Tensor | None = None
        for spec in candidates(layer, yf32):  # the first one is default_spec
            lp = ep.plan_conv_tc(spec, codes, layer.wq, epi, n=n, h=h, w=w, o=layer.o, max_ctas=max_ctas(spec, dev))
            y.fill_(float("nan"))
            launch(lp, dev)  # compile + warm
            if first is None:
                first = y.clone()
            elif not torch.equal(y, first):  # every tile shape computes the same numbers: a mismatch is a bug
                times[spec.name] = math.inf
                self.rejected.append(spec.name)
                continue
            runs = []
            for _ in range(3):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                launch(lp, dev)
                b.record()
                b.synchronize()
                runs.append(a.elapsed_time(b))
            times[spec.name] = statistics.median(runs)
        best = min(candidates(layer, yf32), key=lambda s: times[s.name])
        self.choice[key], self.timings[key] = best, times
        return best


@contextlib.contextmanager
def _tf32_off(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def reference_impls(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s packed layers on the torch reference inside the block."""
    saved = [(m, m.impl) for m in model.modules() if isinstance(m, PackedModule)]
    for m, _ in saved:
        m.impl = reference_forward
    try:
        yield
    finally:
        for m, impl in saved:
            m.impl = impl


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, y: torch.Tensor) -> None:
        self.graph, self.x, self.y = graph, x, y


class EngineRunner:
    """A packed model's forward on the engine (installed as the model's ``forward`` by the cupy backend)."""

    def __init__(self, model: nn.Module, precision: str = "mixed", graphs: bool = True) -> None:
        if precision not in PRECISIONS:
            raise BackendUnavailableError(f"engine precision {precision!r}; choose {', '.join(PRECISIONS)}")
        self.model, self.precision, self.use_graphs = model, precision, graphs
        self.original = type(model).forward.__get__(model)
        self.device: torch.device | None = None
        self.plan: Any = None
        self.note = "not run yet"
        self.graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self.tuner = Tuner()
        self.ops = EngineOps(launch, max_ctas, self.tuner)

    def _setup(self, device: torch.device) -> None:
        self.graphs.clear()
        self.device = device
        off = engine_disabled()
        if off is not None:
            self.plan, self.note = None, f"per-layer kernels (engine off: {off})"
            return
        self.plan, self.note = build_plan(self.model, device, PRECISIONS[self.precision])
        reason = self._self_check(device)
        if reason is not None:
            _DISABLED.append(reason)
            warnings.warn(f"quantsr cupy engine disabled, using the per-layer kernels: {reason}", stacklevel=3)
            self.plan, self.note = None, f"per-layer kernels (engine off: {reason})"

    def _self_check(self, device: torch.device) -> str | None:
        """None when the engine's output on a small input is within SELF_CHECK_DB of the reference."""
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, 24, 40, generator=gen).to(device)
        try:
            with torch.no_grad(), _tf32_off(True), reference_impls(self.model):
                ref = self.original(x).float()
            got = self.eager(x)
        except Exception as exc:  # noqa: BLE001 - any failure of the engine means: do not use it
            return f"self-check failed ({type(exc).__name__}: {str(exc)[:160]})"
        if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
            return "self-check output is not finite or has the wrong shape"
        mse = float(((got.double() - ref.double()) ** 2).mean())
        db = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
        self.note += f"; self-check {db:.1f} dB vs reference"
        return None if db >= SELF_CHECK_DB else f"self-check {db:.1f} dB vs the torch reference (< {SELF_CHECK_DB})"

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the forward a CUDA graph captures (the plan's forward, or the model's own)."""
        prec = PRECISIONS[self.precision]
        with torch.no_grad(), _tf32_off(torch.float32 in (prec.head, prec.tail)):
            if self.plan is not None:
                return self.plan.forward(self.ops, x)
            return self.original(x)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The float32 output as a new tensor (after a replay the graph's buffer is reused by the next one)."""
        with torch.no_grad():
            return self.plan.finish(y) if self.plan is not None else y.clone()

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.core(x))

    def _capture(self, x: torch.Tensor) -> _Graph:
        static_x = x.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.core(static_x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = self.core(static_x)
        return _Graph(graph, static_x, static_y)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not torch.is_tensor(x):
            return self.original(x, *args, **kwargs)
        if not x.is_cuda:
            raise BackendUnavailableError(f"cupy backend got an input on {x.device}; move model and input to CUDA")
        if self.device != x.device:
            self._setup(x.device)
        if not self.use_graphs or torch.cuda.is_current_stream_capturing():
            return self.eager(x)
        key = (tuple(x.shape), x.dtype, tuple(x.stride()))
        hit = self.graphs.get(key)
        if hit is None:
            y = self.eager(x)  # first run of this shape: compiles, tunes, allocates
            try:
                self.graphs[key] = self._capture(x)
            except Exception as exc:  # noqa: BLE001 - capture unsupported here: stay eager
                self.use_graphs = False
                self.note += f"; CUDA graphs off ({type(exc).__name__}: {str(exc)[:120]})"
                torch.cuda.synchronize(x.device)
            while len(self.graphs) > GRAPH_CACHE:
                self.graphs.popitem(last=False)
            return y
        self.graphs.move_to_end(key)
        hit.x.copy_(x)
        hit.graph.replay()
        return self.finish(hit.y)


def install(model: nn.Module, precision: str) -> EngineRunner:
    """Make ``model(x)`` run on the engine (see :class:`EngineRunner`); :func:`uninstall` undoes it."""
    runner = EngineRunner(model, precision, graphs=os.environ.get("QUANTSR_ENGINE_GRAPHS", "1") != "0")
    model.__dict__["forward"] = runner
    return runner


def uninstall(model: nn.Module) -> None:
    if isinstance(model.__dict__.get("forward"), EngineRunner):
        del model.__dict__["forward"]


def runner_of(model: nn.Module) -> EngineRunner | None:
    hit = model.__dict__.get("forward")
    return hit if isinstance(hit, EngineRunner) else None

"""Where the time goes in OpenVINO: our exported model vs OpenVINO's int8 PTQ of the FP32 model (issue #26).

Compiles each IR on the CPU plugin with ``PERF_COUNT`` (1 thread by default), runs a 256x256 input
``--repeat`` times after one warm-up, and sums each executed node's ``real_time`` per group:

* ``int8 conv`` / ``float conv``: Convolution nodes by their runtime precision (u8/i8 vs f32/bf16),
* ``quantize``: FakeQuantize nodes the plugin kept as separate nodes (the others are fused into convs),
* ``concat``, ``eltwise`` (adds, multiplies, activations the plugin fused into one Eltwise node),
  ``reduce/pool`` (channel attention), ``reorder`` (layout/precision conversions), ``other``.

Rows: ``default_ov`` (our ``default`` through the ``openvino`` backend, exact f32 float layers),
``default_ov_bf16`` (the same IR, bf16 float layers), ``ov_int8_nncf`` (NNCF defaults; OpenVINO's default
precision for the rest). Writes ``bench/results/ov_profile.json`` (machine, code version, per-row totals,
groups and the ten slowest nodes)::

    python bench/ov_profile.py --repeat 20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_peers import code_version, machine  # noqa: E402
from cpu_peers_rows import _fp_artifacts  # noqa: E402
from quantsr_cli.backends import use_backend  # noqa: E402
from quantsr_cli.backends.export_openvino import compile_model  # noqa: E402
from quantsr_cli.backends.runtime_common import cache_dir, model_hash  # noqa: E402
from quantsr_cli.engine.modelio import load_model  # noqa: E402

INT8 = ("u8", "i8", "I8", "U8")


def group_of(node_type: str, exec_type: str) -> str:
    """The group a profiled node's time is counted in (see the module docstring)."""
    if node_type == "Convolution":
        return "int8 conv" if any(t in exec_type for t in INT8) else "float conv"
    if node_type == "FakeQuantize":
        return "quantize"
    if node_type == "Concatenation" or node_type == "Concat":
        return "concat"
    if node_type in ("Eltwise", "Subgraph", "Add", "Multiply", "Clamp", "Relu", "PRelu", "Sigmoid", "Minimum",
                     "Maximum", "Round", "Floor"):
        return "eltwise"
    if node_type in ("Reduce", "ReduceMean", "Pooling", "MVN", "AvgPool"):
        return "reduce/pool"
    if node_type == "Reorder":
        return "reorder"
    return "other"


def profile(ir: Path, threads: int, repeat: int, precision: str | None) -> dict[str, Any]:
    """Sum of per-node ``real_time`` over ``repeat`` runs of a (1,3,256,256) input, in ms per run."""
    import openvino as ov

    model = ov.Core().read_model(str(ir))
    if precision is None:  # OpenVINO's own default precision (as the NNCF row of cpu_peers)
        net = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
    else:
        net = compile_model(model, threads, {"INFERENCE_PRECISION_HINT": precision, "PERF_COUNT": True})
    request = net.create_infer_request()
    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    request.infer({0: x})  # warm-up (first-run allocations)
    per_node: dict[tuple[str, str, str], float] = defaultdict(float)
    for _ in range(repeat):
        request.infer({0: x})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                per_node[(info.node_name, info.node_type, info.exec_type)] += info.real_time.total_seconds() * 1e3
    groups: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "nodes": 0})
    for (_, node_type, exec_type), ms in per_node.items():
        g = groups[group_of(node_type, exec_type)]
        g["ms"] += ms / repeat
        g["nodes"] += 1
    total = sum(g["ms"] for g in groups.values())
    slowest = sorted(per_node.items(), key=lambda kv: -kv[1])[:10]
    return {"total_ms": total,
            "groups": {k: {"ms": v["ms"], "share": v["ms"] / total, "nodes": int(v["nodes"])}
                       for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["ms"])},
            "slowest": [{"node": n, "type": t, "exec_type": e, "ms": ms / repeat} for (n, t, e), ms in slowest]}


def exported_ir(model: torch.nn.Module) -> Path:
    """Our OpenVINO IR of ``model`` (exported into, or found in, the ``openvino`` backend's export cache)."""
    use_backend(copy.deepcopy(model), "openvino")
    return cache_dir() / f"{model_hash(model, 'openvino')}.xml"


def setup(cache: Path, model: str) -> tuple[str, str, Path, torch.nn.Module, Path]:
    """(code version, data folder, NNCF's int8 IR of the FP32 IMDN, our packed ``model``, its IR)."""
    version = code_version()
    os.environ.setdefault("QUANTSR_CACHE", str(cache / "exports"))
    data = os.environ.get("QUANTSR_DATA", str(REPO.parent / "shared" / "data"))
    artifacts = cache / "artifacts" / version
    artifacts.mkdir(parents=True, exist_ok=True)
    fp = load_model(str(Path(data) / "weights" / "IMDN_x4.pth")).model.eval()
    nncf_ir = _fp_artifacts(fp, artifacts, data)["nncf"]
    packed = load_model(model).model.eval()
    return version, data, nncf_ir, packed, exported_ir(packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="default")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "quantsr" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ov_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    version, _, nncf_ir, _, ours = setup(args.cache_dir, args.model)
    rows = {f"{args.model}_ov": profile(ours, args.threads, args.repeat, "f32"),
            f"{args.model}_ov_bf16": profile(ours, args.threads, args.repeat, "bf16"),
            "ov_int8_nncf": profile(nncf_ir, args.threads, args.repeat, None)}
    result = {"version": version, "machine": machine(), "load_average": round(os.getloadavg()[0], 2),
              "settings": {"repeat": args.repeat, "threads": args.threads, "input": "1x3x256x256",
                           "model": args.model}, "rows": rows}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    for name, row in rows.items():
        print(f"{name}: {row['total_ms']:.1f} ms " + ", ".join(f"{k} {v['ms']:.1f} ({v['share']:.0%})"
                                                             for k, v in row["groups"].items()))


if __name__ == "__main__":
    main()

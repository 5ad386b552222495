"""What would close the gap to OpenVINO's int8 PTQ (issue #26), measured rather than estimated.

``bench/ov_profile.py`` shows where our exported ``default`` spends the time NNCF's int8 model does not:
the float glue between our quantized convolutions. This script applies, cumulatively, the changes that
would move that glue to int8 -- each one a graph edit of our exported OpenVINO IR standing for a model
change -- and measures every variant in one interleaved run against NNCF's int8 model of the FP32
IMDN, with its Set5/Set14 x4 PSNR:

1. ``exported``: our IR as ``quantsr export`` wrote it up to 43222a7 (exact: the reference). Since then
   the export also applies ``openvino_passes`` (step 5, and an exact u8 distillation concat that moves
   the concat past the fusion conv's own quantizer); they are left out here so each step is measured
   on its own, and ``bench/cpu_peers.py`` times the export as it is.
2. ``+u8_concat``: an 8-bit quantizer on each IMDB's distillation concatenation (the CCA input), placed
   on the concat inputs so the concat, the CCA statistics and the 1x1 fusion conv read u8.
3. ``+int8_head_upsampler``: ``fea_conv`` and ``upsampler.0`` at W8A8 (per-output-channel weights;
   the image input at step 1/255, the upsampler input at a calibrated step).
4. ``+u8_residual``: an 8-bit quantizer on each IMDB's output (the residual stream).
5. ``+one_pass_variance``: the CCA's ``mean((x - mean)^2)`` as ``sum(x^2)/N - mean^2`` (ReduceL2):
   the same value up to float rounding, one pass over ``x`` instead of two.
6. ``+bf16_glue``: step 5 compiled with OpenVINO's bf16 for the remaining float layers (its CPU default,
   which the NNCF row also runs with).

Steps 2-4 are post-training: each new 8-bit quantizer's step is the MSE-optimal symmetric step over 32
LR crops of T91/BSD200 (the calibration data of ``bench/cpu_peers.py``), with no training, so their PSNR
is what a PTQ of those points costs (QAT would recover part of it). Timings: 1 thread (the issue's
acceptance), 256x256 whole and 1024x768 in 256-pixel tiles, min and median of ``--repeat`` interleaved
rounds. Writes ``bench/results/ov_headroom.json``::

    python bench/ov_headroom.py --repeat 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from cpu_peers import SIZES, machine, psnr_of, time_group  # noqa: E402
from cpu_peers_rows import Rows, _ov_fn, calibration_images  # noqa: E402
from ov_profile import setup  # noqa: E402
from quantsr_cli.backends.openvino_passes import one_pass_variance as _one_pass_variance  # noqa: E402
from quantsr_cli.engine.modelio import load_model  # noqa: E402

STEPS = ("exported", "+u8_concat", "+int8_head_upsampler", "+u8_residual", "+one_pass_variance", "+bf16_glue")


def mse_step(x: torch.Tensor, levels: int = 256) -> float:
    """The symmetric step (codes ``-levels/2 .. levels/2 - 1``) with the least MSE on ``x`` (a grid search)."""
    qmin, qmax = -(levels // 2), levels // 2 - 1
    amax = float(x.abs().max()) or 1.0
    best = (float("inf"), amax / qmax)
    for frac in np.linspace(0.2, 1.0, 81):
        step = amax * frac / qmax
        err = float(((torch.clamp(torch.round(x / step), qmin, qmax) * step - x) ** 2).mean())
        best = min(best, (err, step))
    return best[1]


def calibrate(model: torch.nn.Module, crops: list[np.ndarray]) -> dict[str, list[float]]:
    """Steps of the new 8-bit points of an IMDN: ``cat`` (each block's CCA input), ``out`` (each block's
    output), ``up`` (the upsampler's input), from forward hooks over ``crops``."""
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, t: torch.Tensor) -> None:
        seen.setdefault(name, []).append(t.detach().flatten())

    hooks = []
    blocks = model.block_names()
    for k, name in enumerate(blocks):
        block = model.get_submodule(name)
        hooks.append(block.cca.register_forward_pre_hook(lambda m, i, k=k: keep(f"cat{k}", i[0])))
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: keep(f"out{k}", o)))
    hooks.append(model.upsampler[0].register_forward_pre_hook(lambda m, i: keep("up", i[0])))
    with torch.inference_mode():
        for crop in crops:
            model(torch.from_numpy(crop))
    for h in hooks:
        h.remove()
    steps = {name: mse_step(torch.cat(values)) for name, values in seen.items()}
    return {"cat": [steps[f"cat{k}"] for k in range(len(blocks))],
            "out": [steps[f"out{k}"] for k in range(len(blocks))], "up": [steps["up"]]}


def _const(value: Any) -> Any:
    import openvino as ov

    return ov.opset13.constant(np.asarray(value, dtype=np.float32).reshape(1, 1, 1, 1))


def _fq8(value: Any, step: float) -> Any:
    """An 8-bit symmetric FakeQuantize of ``value`` (256 levels, codes -128..127 at ``step``)."""
    import openvino as ov

    lo, hi = _const(-128 * step), _const(127 * step)
    return ov.opset13.fake_quantize(value, lo, hi, lo, hi, 256)


def _consumers(node: Any) -> list[Any]:
    return [t.get_node() for t in node.output(0).get_target_inputs()]


def block_concats(ov_model: Any) -> list[Any]:
    """Each IMDB's distillation Concat (its output feeds the CCA's ReduceMean), in graph order."""
    return [n for n in ov_model.get_ordered_ops() if n.get_type_name() == "Concat" and
            any(c.get_type_name() == "ReduceMean" for c in _consumers(n))]


def block_outputs(ov_model: Any, blocks: int) -> list[Any]:
    """The nodes giving each IMDB's output: the inputs of the final ``blocks``-way concatenation (behind
    the FakeQuantize nodes our export puts on its inputs)."""
    cats = [n for n in ov_model.get_ordered_ops() if n.get_type_name() == "Concat" and n.get_input_size() == blocks]
    nodes = []
    for value in cats[-1].input_values():
        node = value.get_node()
        nodes.append(node.input_value(0).get_node() if node.get_type_name() == "FakeQuantize" else node)
    return nodes


def add_u8_concat(ov_model: Any, steps: dict[str, list[float]]) -> None:
    concats = block_concats(ov_model)
    assert len(concats) == len(steps["cat"]), (len(concats), steps["cat"])
    for node, step in zip(concats, steps["cat"]):
        for i in range(node.get_input_size()):
            node.input(i).replace_source_output(_fq8(node.input_value(i), step).output(0))


def add_int8_head_upsampler(ov_model: Any, steps: dict[str, list[float]]) -> None:
    """Per-output-channel int8 weights and an 8-bit input for the two float 3x3 convs (head, upsampler)."""
    import openvino as ov

    opset, done = ov.opset13, []
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() != "Convolution":
            continue
        weight = node.input_value(1).get_node()
        if weight.get_type_name() != "Constant" or weight.get_element_type() != ov.Type.f32:
            continue
        w = weight.get_data()
        if w.shape[2:] != (3, 3) or w.shape[0] < 3:  # skip the CCA's 1x1 convs
            continue
        scale = np.abs(w).reshape(w.shape[0], -1).max(1) / 127
        codes = np.round(w / scale[:, None, None, None]).astype(np.int8)
        deq = opset.multiply(opset.convert(opset.constant(codes), ov.Type.f32),
                             opset.constant(scale.reshape(-1, 1, 1, 1).astype(np.float32)))
        node.input(1).replace_source_output(deq.output(0))
        if w.shape[1] == 3:  # the image: 256 levels on [0, 1] (its own 8-bit grid)
            lo, hi = _const(0.0), _const(1.0)
            fq = opset.fake_quantize(node.input_value(0), lo, hi, lo, hi, 256)
        else:
            fq = _fq8(node.input_value(0), steps["up"][0])
        node.input(0).replace_source_output(fq.output(0))
        done.append(w.shape)
    assert len(done) == 2, done


def add_u8_residual(ov_model: Any, steps: dict[str, list[float]]) -> None:
    outs = block_outputs(ov_model, len(steps["out"]))
    for node, step in zip(outs, steps["out"]):
        users = list(node.output(0).get_target_inputs())
        fq = _fq8(node.output(0), step)
        for user in users:
            user.replace_source_output(fq.output(0))


def one_pass_variance(ov_model: Any) -> None:
    """Step 5: :func:`openvino_passes.one_pass_variance` (which ``quantsr export`` now applies itself)."""
    assert _one_pass_variance(ov_model), "no CCA variance found"


def plain_ir(model: torch.nn.Module, cache: Path) -> Path:
    """``model``'s IR without the graph passes of ``openvino_passes`` (as ``quantsr export`` wrote it up to
    43222a7): the base the steps edit, so that each step's effect is measured on its own."""
    from quantsr_cli.backends.export_openvino import convert, save_ir
    from quantsr_cli.backends.runtime_common import model_hash

    path = cache / "plain" / f"{model_hash(model, 'openvino')}.xml"
    if not (path.is_file() and path.with_suffix(".bin").is_file()):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_ir(convert(model, passes=False), path)
    return path


def variants(ir: Path, steps: dict[str, list[float]]) -> dict[str, tuple[Any, str]]:
    """Step name -> (``openvino.Model``, inference precision), cumulative as the module docstring lists."""
    import openvino as ov

    edits = {"+u8_concat": add_u8_concat, "+int8_head_upsampler": add_int8_head_upsampler,
             "+u8_residual": add_u8_residual, "+one_pass_variance": lambda m, s: one_pass_variance(m)}
    out = {}
    for i, step in enumerate(STEPS):
        model = ov.Core().read_model(str(ir))
        for done in STEPS[1:i + 1]:
            if done in edits:
                edits[done](model, steps)
        model.validate_nodes_and_infer_types()
        out[step] = (model, "bf16" if step == "+bf16_glue" else "f32")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--model", default="default")
    parser.add_argument("--trained", nargs="*", default=[], metavar="MODEL",
                        help="also time these models (e.g. QAT of the 8-bit points) as exported, and with step 5")
    parser.add_argument("--no-psnr", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "quantsr" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ov_headroom.json")
    args = parser.parse_args()
    import openvino as ov

    torch.set_num_threads(1)
    version, data, nncf_ir, packed, _ = setup(args.cache_dir, args.model)
    ours = plain_ir(packed, args.cache_dir)
    steps = calibrate(packed, calibration_images(data))

    rows = Rows()
    rows.add("ov_int8_nncf", _ov_fn(nncf_ir, 1, None, rows), "OpenVINO int8 PTQ (NNCF) of the FP32 model", 0)
    for name, (model, precision) in variants(ours, steps).items():
        rows.add(name, _ov_fn(model, 1, precision, rows), name, 0)
    trained = {}
    for source in args.trained:
        ir = plain_ir(load_model(source).model.eval(), args.cache_dir)
        label = Path(source).parent.name if source.endswith(".safetensors") else source
        for name, edit in ((f"trained:{label}", None), (f"trained:{label}+one_pass_variance", one_pass_variance)):
            ov_model = ov.Core().read_model(str(ir))
            if edit is not None:
                edit(ov_model)
            rows.add(name, _ov_fn(ov_model, 1, "f32", rows), name, 0)
            trained[name] = label if label == source else f"runs/{label}/{Path(source).name}"
    result: dict[str, Any] = {"version": version, "machine": machine(), "model": args.model,
                              "settings": {"repeat": args.repeat, "threads": 1, "sizes": list(SIZES),
                                           "tile": "1024x768: 256 tiles + 16 px context; 256: whole"},
                              "calibration": steps, "steps": list(STEPS), "trained": trained, "rows": {}}
    for name in rows.names():
        result["rows"][name] = {"times": {}}
        if not args.no_psnr:
            result["rows"][name]["psnr"] = psnr_of(rows.fn[name], data)
            print(name, result["rows"][name]["psnr"], flush=True)
    result["load_average"] = {}
    for size, hw in SIZES.items():
        before = os.getloadavg()[0]
        times = time_group(rows.fn, hw, args.repeat)
        result["load_average"][size] = [round(before, 2), round(os.getloadavg()[0], 2)]
        for name, t in times.items():
            result["rows"][name]["times"][size] = {"min": t["min"], "median": t["median"]}
        ref = times["ov_int8_nncf"]
        for name, t in times.items():
            result["rows"][name]["times"][size]["vs_nncf_min"] = ref["min"] / t["min"]
            result["rows"][name]["times"][size]["vs_nncf_median"] = ref["median"] / t["median"]
            print(f"{size} {name}: {t['min']:.3f} s (min), vs NNCF {ref['min'] / t['min']:.3f}", flush=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()

"""``quantsr info`` and ``quantsr pack``: size/compute accounting and QAT -> packed conversion.

Counting conventions (the QuantSR papers'):

- params: weights, biases and other float parameters; quantizer steps, shifts and per-bit scales are
  not counted (they are a few scalars per layer and listed in ``file_bytes`` anyway);
- MACs: conv/linear multiply-accumulates plus the attention matmuls (q·kᵀ and attn·v) at a
  ``3 x 256 x 256`` LR input; bias adds, activations and pixel-shuffle are not counted;
- equivalent ("BOPs-style") params and ops: the quantized part times ``w_bits / 32`` plus the
  full-precision part as is; the quantized MACs are those of quantized layers and the attention
  matmuls whose operands are quantized (the activation points a model declares, see ``count_macs``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantsr_cli.config import QuantConfig
from quantsr_cli.engine.modelio import LoadedModel, load_model, loading, refuse_exported, resolve_model_path
from quantsr_cli.engine.outputs import check_model_output, check_outputs, clean_temp_files
from quantsr_cli.errors import CheckpointError, ConfigError
from quantsr_cli.metrics.complexity import count_macs
from quantsr_cli.models import ARCHS, arch_spec, block_hparams, build_model
from quantsr_cli.packing import PackedModule
from quantsr_cli.packing import io as packing_io
from quantsr_cli.quant import ActQuant, QConv2d, QLinear, layer_plan, method_spec

INPUT_SHAPE = (1, 3, 256, 256)


def layer_bits_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (w_bits, a_bits)}`` of the quantized layers of a loaded QAT or packed model (activation
    points: ``w_bits`` 32); read from the layers themselves, which packing checked against the file's config."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedModule) or isinstance(m, (QConv2d, QLinear, ActQuant)):
            out[name] = (int(getattr(m, "w_bits", 32) or 32), int(getattr(m, "a_bits", 32) or 32))
    return out


def layer_table(fp_model: nn.Module, bits: dict[str, tuple[int, int]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per-layer rows (name, type, shape, bits, params, MACs) and MAC totals at :data:`INPUT_SHAPE`."""
    macs = count_macs(fp_model, INPUT_SHAPE)
    rows = []
    for name, module in fp_model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) or name in macs["layers"]:
            w, a = bits.get(name, (32, 32))
            weight = getattr(module, "weight", None)
            rows.append({
                "name": name, "type": type(module).__name__,
                "shape": list(weight.shape) if weight is not None else [],
                "w_bits": w if weight is not None else 32,
                "a_bits": a,
                "params": sum(p.numel() for p in module.parameters(recurse=False)),
                "macs": int(macs["layers"].get(name, 0)),
            })
    for name, count in macs["layers"].items():
        if name not in {r["name"] for r in rows}:
            rows.append({"name": name, "type": "matmul", "shape": [], "w_bits": 32, "a_bits": 32, "params": 0,
                         "macs": int(count)})
    return rows, macs


def fp_reasons(fp_model: nn.Module, bits: dict[str, tuple[int, int]], quant: QuantConfig | None) -> dict[str, str]:
    """Why each Conv2d/Linear that is not quantized stays full precision."""
    arch = getattr(fp_model, "arch", "")
    known = {**getattr(fp_model, "fp_layers", {}),
             **{n: f"cannot be packed: {r}" for n, r in getattr(fp_model, "unquantizable", {}).items()}}
    out = {}
    for name, module in fp_model.named_modules():
        if type(module) not in (nn.Conv2d, nn.Linear) or name in bits:
            continue
        rule = quant.rule_for(name) if quant is not None else None
        if rule is not None and rule[1] == 32:
            out[name] = f"per-layer rule {rule[0]!r}: fp"
        else:
            out[name] = known.get(name, f"the {arch} rule keeps it full precision")
    return out


def other_fp_params(fp_model: nn.Module) -> dict[str, int]:
    """Parameters outside Conv2d/Linear layers (PReLU, norms, attention tables, custom layers) by module
    type: operations quantsr does not pack, which stay full precision."""
    out: dict[str, int] = {}
    for module in fp_model.modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            continue
        n = sum(p.numel() for p in module.parameters(recurse=False))
        if n:
            out[type(module).__name__] = out.get(type(module).__name__, 0) + n
    return out


def describe(arch: str, hparams: dict[str, Any], w_bits: int = 32, a_bits: int = 32,
             bits: dict[str, tuple[int, int]] | None = None, quant: QuantConfig | None = None) -> dict[str, Any]:
    """Params/MACs/equivalent-ops report of an architecture with its quantized layers: ``bits``
    (``{name: (w, a)}``, a loaded model's) or, by default, the plan of ``quant`` (the arch's rule at
    ``w_bits``/``a_bits`` plus per-layer rules)."""
    family = getattr(ARCHS.get(arch), "family", "sr")
    if family != "sr":  # its MAC input (and quantization rule) is the SR one: a diffusion model would not fit
        raise ConfigError(f"`quantsr info` describes SR models; {arch!r} is a {family} model")
    fp_model = build_model(arch, **hparams).eval()
    bits_w, bits_a = (32, 32) if w_bits == a_bits == 32 else (w_bits, a_bits)
    if bits is None:
        if quant is None and bits_w < 32:
            quant = QuantConfig(w_bits=bits_w, a_bits=bits_a)
        bits = layer_plan(fp_model, quant) if quant is not None and not quant.full_precision else {}
    with torch.no_grad():
        rows, macs = layer_table(fp_model, bits)
    total_params = sum(p.numel() for p in fp_model.parameters())
    q_rows = [r for r in rows if r["w_bits"] < 32]
    q_params = sum(r["params"] - (r["shape"][0] if r["type"] != "Identity" and r["shape"] else 0)
                   for r in q_rows)  # quantized weights; their biases stay FP
    eq_q_params = sum((r["params"] - (r["shape"][0] if r["shape"] else 0)) * r["w_bits"] / 32 for r in q_rows)
    q_macs = sum(r["macs"] for r in rows if r["a_bits"] < 32)
    eq_q_macs = sum(r["macs"] * (r["w_bits"] if r["shape"] else bits_w) / 32 for r in rows if r["a_bits"] < 32)
    fp_macs = int(macs["total"]) - q_macs
    eq_params = (total_params - q_params) + eq_q_params
    eq_ops = fp_macs + eq_q_macs
    for r in rows:
        r["macs_share"] = r["macs"] / max(int(macs["total"]), 1)
    spec = arch_spec(arch)
    return {
        "arch": arch, "label": spec.display(hparams), "scale": int(hparams.get("upscale", 0)), "hparams": hparams,
        "w_bits": bits_w, "a_bits": bits_a,
        "params": total_params, "quantized_params": q_params, "fp_params": total_params - q_params,
        "fp32_bytes": total_params * 4,
        "macs": int(macs["total"]), "quantized_macs": q_macs, "input_shape": list(INPUT_SHAPE),
        "equivalent_params": eq_params, "equivalent_ops": eq_ops,
        "params_reduction": 1 - eq_params / total_params, "ops_reduction": 1 - eq_ops / max(int(macs["total"]), 1),
        "quantized_layers": len([r for r in rows if r["name"] in bits]),
        "fp_layers": fp_reasons(fp_model, bits or layer_plan(fp_model, quant or QuantConfig()), quant),
        "other_fp_params": other_fp_params(fp_model),
        "layers": rows,
        **attention_v_quantizer(fp_model.hparams, bits_a),
    }


def attention_v_quantizer(hparams: dict[str, Any], a_bits: int) -> dict[str, str]:
    """``{"v_quantizer": "own" | "shared with q"}`` for a quantized model with window attention, else ``{}``.

    ``shared with q`` is the released QuantSR code's behaviour (hparam ``share_qv_quantizer``).
    """
    if a_bits >= 32 or "share_qv_quantizer" not in hparams:
        return {}
    return {"v_quantizer": "shared with q" if hparams["share_qv_quantizer"] else "own"}


def model_info(
    source: str | None = None, *, arch: str | None = None, scale: int = 4, bits: int | None = None,
    blocks: int | None = None, method: str | None = None,
) -> dict[str, Any]:
    """Report for a model file/bundled name, or for ``arch`` at ``bits`` with ``method`` (default: the
    default method; no file needed). A file's bits and method are its metadata's."""
    if source is None and arch is None:
        raise ConfigError("give a model file (or bundled name) or --arch")
    if source is not None:
        loaded: LoadedModel = load_model(source)
        file_bits = (32, 32)
        quant = getattr(loaded.model, "quant_config", None)
        if loaded.kind != "fp":
            file_bits = (int(loaded.meta.get("w_bits", 32)), int(loaded.meta.get("a_bits", 32)))
        report = describe(loaded.arch, dict(loaded.model.hparams), *file_bits, bits=layer_bits_of(loaded.model),
                          quant=quant if isinstance(quant, QuantConfig) else None)
        report["detected"] = loaded.detected
        report["kind"] = loaded.kind
        report["method"] = loaded.meta.get("method")
        path = resolve_model_path(source)
        report["file"] = str(path)
        report["file_bytes"] = path.stat().st_size
        if path.suffix == ".safetensors":
            size = packing_io.size_report(path)
            report["file_params"] = size.get("params")
            report["file_quantized_params"] = size.get("quantized_params")
    else:
        hparams = {"upscale": scale, **block_hparams(arch, blocks)}
        quant = None
        if bits is not None:
            quant = QuantConfig(**({"method": method} if method else {}), w_bits=bits, a_bits=bits)
            method_spec(quant.method)
        report = describe(arch, hparams, *((quant.w_bits, quant.a_bits) if quant else (32, 32)), quant=quant)
        report["kind"] = "architecture"
        report["method"] = quant.method if quant is not None else None
        report["file_bytes"] = None
    report["compression"] = report["fp32_bytes"] / report["file_bytes"] if report.get("file_bytes") else None
    return report


def pack_file(src: str, dst: Path) -> dict[str, Any]:
    """Convert a fake-quant (``qat``) model file into the packed format; returns its size report."""
    path = resolve_model_path(src)
    refuse_exported(path)
    check_model_output(dst, "-o")
    check_outputs([(dst, "-o")], [(path, "model")])
    meta = packing_io.read_metadata(path)
    if meta.get("kind") != "qat":
        raise CheckpointError(f"expected a fake-quant (qat) model file, got kind {meta.get('kind')!r}", path)
    with loading(path):
        model = packing_io.load_model_file(path)
    clean_temp_files(dst.parent)
    extra = meta.get("extra")
    packing_io.save_model(model, dst, model.quant_config, json.loads(extra) if extra else None, pack=True)
    return packing_io.size_report(dst)

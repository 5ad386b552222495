"""Markdown tables of ``bench/results/cpu_peers.json`` (``bench/cpu_peers.py``), used by ``bench/report.py``.

Nothing here measures anything; the same JSON gives the same bytes.
"""

from __future__ import annotations

from typing import Any

from report_tables import NA, table

REF = "ov_int8_nncf"  # the runtime's own int8 PTQ: the speed to match (issue #26)
SIZES = ("256", "1024x768")
LABELS = {"256": "256²", "1024x768": "1024×768"}


def _label(name: str, row: dict[str, Any]) -> str:
    what = row["what"]
    for model in ("default-w2", "default"):
        if name.startswith(model + "_"):
            backend = name[len(model) + 1:]
            if backend == "ov_bf16":
                return f"`{model}`, its IR with bf16 float layers (not exact)"
            text = f"`{model}` {'W2A2' if model == 'default-w2' else 'W4A4'}, `" + \
                {"cpu": "cpu", "ort": "onnxruntime", "ov": "openvino"}[backend] + "`"
            return text
    return what


def _fastest(d: dict[str, Any]) -> set[str]:
    return {v["fastest"] for v in d.get("ratios", {}).values()}


def peers(d: dict[str, Any], threads: int) -> list[str]:
    """One row per candidate: Set5/Set14 x4, file MB, min seconds per size (x torch FP32), speed vs NNCF int8."""
    rows, bold = d["rows"], _fastest(d)
    base, ref = rows["torch_fp32"]["times"], rows[REF]["times"]
    keys = [f"t{threads}_{s}" for s in SIZES]
    out = []
    for name, row in rows.items():
        psnr = row.get("psnr") or {}
        cells = []
        for k in keys:
            t = row["times"].get(k)
            cells.append(f"{t['min']:.2f} s ({base[k]['min'] / t['min']:.1f}×)" if t and k in base else NA)
        vs = " / ".join(f"{ref[k]['min'] / row['times'][k]['min']:.2f}" if k in row["times"] and k in ref else NA
                        for k in keys)
        label = _label(name, row)
        out.append([f"**{label}**" if name in bold else label,
                    f"{psnr['Set5']:.2f} / {psnr['Set14']:.2f}" if psnr else NA,
                    f"{row['bytes'] / 1e6:.2f}" if row.get("bytes") else NA, *cells, vs])
    header = ["IMDN x4", "Set5 / Set14", "MB", *(f"{LABELS[s]}, {threads} thread{'s' * (threads > 1)}" for s in SIZES),
              "speed vs NNCF int8 (" + " / ".join(LABELS[s] for s in SIZES) + ")"]
    return table(header, out)


def ratio_line(d: dict[str, Any], model: str = "default", threads: int = 1) -> str:
    """``0.84× (256²) and 0.80× (1024×768)``: the fastest exact backend of ``model`` vs NNCF int8, min times."""
    r = d["ratios"]
    return " and ".join(f"{r[f'{model}/t{threads}_{s}']['vs_ov_int8_nncf_min']:.2f}× ({LABELS[s]})" for s in SIZES
                        if f"{model}/t{threads}_{s}" in r)


def settings(d: dict[str, Any]) -> list[str]:
    """The run's settings, machine and the load average around each timing group."""
    m, s = d["machine"], d["settings"]
    load = d.get("load_average") or {}
    loads = ", ".join(f"{k}: {v[0]:.1f}→{v[1]:.1f}" for k, v in load.items() if v) or "not recorded"
    return [f"`python bench/cpu_peers.py --repeat {s['repeat']}`, code {d['version']}; {m.get('cpu')}, "
            f"{m.get('cores')} cores ({', '.join(m.get('isa', []))}); torch {m.get('torch')}, OpenVINO "
            f"{str(m.get('openvino')).split('-')[0]}, ONNX Runtime {m.get('onnxruntime')}, NNCF {m.get('nncf')}. "
            f"One interleaved run, min of {s['repeat']} (medians in the JSON); {s['tile']}. "
            f"1-minute load average before→after each timing group: {loads}."]


def headline(d: dict[str, Any]) -> list[str]:
    """README: the rows a deploying user chooses between, 1 thread."""
    keep = ("torch_fp32", "ov_bf16", REF, "default_cpu", "default_ov", "default-w2_ov")
    sub = {**d, "rows": {k: v for k, v in d["rows"].items() if k in keep}}
    return peers(sub, 1)


def profile(d: dict[str, Any]) -> list[str]:
    """``bench/ov_profile.py``: ms per run in each node group (share of the total), one column per IR."""
    rows = d["rows"]
    groups = list(dict.fromkeys(g for r in rows.values() for g in r["groups"]))
    out = []
    for g in groups + ["total"]:
        cells = []
        for r in rows.values():
            if g == "total":
                cells.append(f"**{r['total_ms']:.0f}**")
            else:
                v = r["groups"].get(g)
                cells.append(f"{v['ms']:.1f} ({v['share']:.0%}, {v['nodes']} node{'s' * (v['nodes'] != 1)})" if v else NA)
        out.append([g, *cells])
    s = d["settings"]
    header = [f"ms per {s['input']} run, {s['threads']} thread{'s' * (s['threads'] > 1)}", *(f"`{n}`" for n in rows)]
    slow = {n: r["slowest"][0] for n, r in rows.items()}
    top = "; ".join(f"`{n}`: {v['node']} {v['exec_type']} {v['ms']:.1f} ms" for n, v in slow.items())
    return table(header, out) + ["", f"Slowest node of each: {top}. `python bench/ov_profile.py --repeat "
                                     f"{s['repeat']}`, code {d['version']}, load average {d['load_average']}."]


HEADROOM_WHAT = {
    "ov_int8_nncf": "OpenVINO int8 PTQ (NNCF) of the FP32 model: the reference",
    "exported": "our IR without the export's graph passes (as `quantsr export` wrote it up to 43222a7; exact)",
    "+u8_concat": "+ 8-bit quantizer on each block's distillation concat (CCA input)",
    "+int8_head_upsampler": "+ first conv and upsampler at W8A8",
    "+u8_residual": "+ 8-bit quantizer on each block's output (residual stream)",
    "+one_pass_variance": "+ CCA variance in one pass (same math)",
    "+bf16_glue": "+ remaining float layers in bf16",
}


def _headroom_label(name: str, d: dict[str, Any]) -> str:
    if not name.startswith("trained:"):
        return HEADROOM_WHAT.get(name, name)
    source = d.get("trained", {}).get(name, name)
    return f"**`{source}`** (trained with those 8-bit points), as exported" + \
        (" + CCA variance in one pass" if name.endswith("+one_pass_variance") else " (exact)")


def headroom(d: dict[str, Any]) -> list[str]:
    """``bench/ov_headroom.py``: each cumulative step's Set5/Set14 (PTQ of the new points) and speed vs NNCF."""
    out = []
    for name, row in d["rows"].items():
        psnr = row.get("psnr") or {}
        cells = [f"{row['times'][s]['vs_nncf_min']:.3f} ({row['times'][s]['min']:.3f} s)" if s in row["times"] else NA
                 for s in SIZES]
        out.append([_headroom_label(name, d), f"{psnr['Set5']:.2f} / {psnr['Set14']:.2f}" if psnr else NA, *cells])
    s = d["settings"]
    header = [f"`{d['model']}` via OpenVINO, cumulative", "Set5 / Set14",
              *(f"speed vs NNCF, {LABELS[z]} (min s)" for z in SIZES)]
    loads = ", ".join(f"{k}: {v[0]:.1f}→{v[1]:.1f}" for k, v in (d.get("load_average") or {}).items())
    trained = sorted(set((d.get("trained") or {}).values()))
    command = f"python bench/ov_headroom.py --repeat {s['repeat']}" + "".join(f" --trained {t}" for t in trained[:1]) + \
        "".join(f" {t}" for t in trained[1:])
    return table(header, out) + ["", f"`{command}`, code {d['version']}, "
                                     f"1 thread, min of {s['repeat']} interleaved rounds (medians in the JSON); "
                                     f"{s['tile']}; load average before→after: {loads}."]

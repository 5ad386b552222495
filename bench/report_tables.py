"""Markdown tables of the CPU results in ``bench/results/*.json`` (used by ``bench/report.py``).

Each function takes the loaded JSON of one results file and returns markdown lines; nothing here measures
anything. Deterministic: the same JSON gives the same bytes.
"""

from __future__ import annotations

from typing import Any

NA = "—"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def version(d: dict[str, Any] | None) -> str:
    """``0.1.0+bfd8b74``; ``not recorded`` for transcribed results; backfilled ones say so."""
    if not d:
        return "not recorded"
    text = f"{d.get('package', '?')}+{d.get('git', '?')}"
    return text + " (from git log)" if d.get("note") else text


def source(name: str, d: dict[str, Any]) -> list[str]:
    """The line under a table that names its file and code version."""
    v = d.get("code_version", (d.get("settings") or {}).get("code_version"))
    return ["", f"<sub>`bench/results/{name}.json`, code {version(v)}.</sub>"]


def _pair(m: dict[str, Any] | None, digits: int = 2) -> str:
    return f"{m['psnr']:.{digits}f} / {m['ssim']:.4f}" if m else NA


def headline(b: dict[str, Any]) -> list[str]:
    """FP32 IMDN, the two bundled models and bicubic: Set5/Set14 x4 and file sizes."""
    rows = b["rows"]
    fp_bytes = rows["imdn_x4"]["params"] * 4
    out = []
    for key, label in (("imdn_x4", "FP32 IMDN (published weights)"), ("default", "`default` (RBD W4A4, packed)"),
                       ("default-w2", "`default-w2` (RBD W2A2, packed)"), ("bicubic_x4", "bicubic")):
        r = rows[key]
        if key == "imdn_x4":
            size = f"{fp_bytes / 1e6:.2f} MB (FP32)"
        elif "file_bytes" in r:
            size = f"{r['file_bytes']:,} B ({fp_bytes / r['file_bytes']:.1f}× smaller)"
        else:
            size = NA
        out.append([label, _pair(r["Set5"]), _pair(r["Set14"]), size])
    return table(["IMDN x4", "Set5 PSNR / SSIM", "Set14 PSNR / SSIM", "file"], out)


def cpu_backend_psnr(b: dict[str, Any]) -> list[str]:
    """``W4A4 31.7118 vs 31.7089 dB, W2A2 ...``: Set5 of the bundled models, ``cpu`` backend vs ``torch``."""
    rows = b["rows"]
    return [", ".join(f"{label} {rows[k]['cpu_backend']['Set5']['psnr']:.4f} vs {rows[k]['Set5']['psnr']:.4f} dB"
                      for k, label in (("default", "W4A4"), ("default-w2", "W2A2")))]


def eval_reference(b: dict[str, Any]) -> list[str]:
    rows, pub = b["rows"], b["published"]
    out = []
    for kind, label in (("imdn", "IMDN (FP32, published weights)"), ("bicubic", "bicubic (MATLAB-exact `imresize`)")):
        x4, x2, p4, p2 = rows[f"{kind}_x4"], rows[f"{kind}_x2"], pub[f"{kind}_x4"], pub[f"{kind}_x2"]
        published = (f"{p4['Set5']['psnr']:.2f} / {p4['Set5']['ssim']:.4f}, {p4['Set14']['psnr']:.2f}, "
                     f"{p2['Set5']['psnr']:.2f}")
        out.append([label, _pair(x4["Set5"]), f"{x4['Set14']['psnr']:.2f}", f"{x2['Set5']['psnr']:.2f}", published])
    return table(["model", "Set5 x4 PSNR / SSIM", "Set14 x4 PSNR", "Set5 x2 PSNR", "published"], out) + source(
        "bundled_models", b)


def bundled(b: dict[str, Any], t: dict[str, Any]) -> list[str]:
    rows = b["rows"]
    fp_bytes = rows["imdn_x4"]["params"] * 4
    out = [["FP32 IMDN (published weights)", NA, _pair(rows["imdn_x4"]["Set5"]), _pair(rows["imdn_x4"]["Set14"]),
            f"{fp_bytes / 1e6:.2f} MB (FP32)", NA]]
    for key in ("default", "default-w2"):
        r = rows[key]
        out.append([f"`{key}` (RBD W{r['bits'][0]}A{r['bits'][2]})", t["training"][key], _pair(r["Set5"], 3),
                    _pair(r["Set14"], 3), f"{r['file_bytes']:,} B ({fp_bytes / r['file_bytes']:.1f}×)",
                    f"≥ {t['targets'][key]['Set5']}"])
    out.append(["bicubic", NA, _pair(rows["bicubic_x4"]["Set5"]), _pair(rows["bicubic_x4"]["Set14"]), NA, NA])
    return table(["model", "training", "Set5 x4 PSNR / SSIM", "Set14 x4 PSNR / SSIM", "packed file", "Set5 target"],
                 out) + source("bundled_models", b)


def history(t: dict[str, Any], per_row: int = 10) -> list[str]:
    """Validation PSNR per run, ``per_row`` validations a table row (the best one in bold)."""
    out: list[str] = []
    for run in t["runs"]:
        points = run["validation"]
        best = max(v for _, v in points)
        out += [f"{run['label']}: `{run['command']}`", ""]
        per = len(points) if len(points) <= per_row + 2 else per_row
        for start in range(0, len(points), per):
            chunk = points[start:start + per]
            cells = [f"**{v:.2f}**" if v == best else f"{v:.2f}" for _, v in chunk]
            out += table(["iteration", *[str(i) for i, _ in chunk]], [["Set5", *cells]]) + [""]
    return out + source("bundled_training", t)[1:]


def calibration(c: dict[str, Any]) -> list[str]:
    rows = [[r["label"], *(NA if v is None else f"{v:.2f}" for v in r["psnr"])] for r in c["rows"]]
    header = ["IMDN x4 W2A2", *("start" if i == 0 else str(i) for i in c["iterations"])]
    return table(header, rows) + source("calibration_imdn_w2a2", c)


def methods(m: dict[str, Any]) -> list[str]:
    out = []
    for r in m["rows"]:
        kb = f"{r['file_bytes'] / 1024:.0f}" if r.get("file_bytes") else "-"
        out.append([r["label"], r["method"], r["bits"], f"{r['Set5']['psnr']:.2f}", f"{r['Set5']['ssim']:.4f}",
                    f"{r['Set14']['psnr']:.2f}", f"{r['Set14']['ssim']:.4f}", str(r.get("params") or "-"),
                    str(r.get("quantized_params") or "-"), str(r.get("macs_g") or "-"), kb])
    return table(["model", "method", "W/A", "Set5 PSNR", "Set5 SSIM", "Set14 PSNR", "Set14 SSIM", "params",
                  "quantized", "MACs (G)", "file (KB)"], out) + source("methods_x4", m)


def dqa(m: dict[str, Any]) -> list[str]:
    rows = [[r["label"], str(r["blocks"]), f"{r['Set5']['psnr']:.2f}", f"{r['Set14']['psnr']:.2f}"] for r in m["dqa"]]
    return table(["DQA (quantsr-c, RBD W4A4)", "blocks", "Set5 PSNR", "Set14 PSNR"], rows) + source("methods_x4", m)


def ablation(a: dict[str, Any]) -> list[str]:
    out = []
    for r in a["rows"]:
        out.append([r["label"], str(r["blocks"]), _pair(r["Set5"]), _pair(r["Set14"]), str(r.get("params") or "-"),
                    str(r.get("quantized_params") or "-"), str(r.get("macs_g") or "-"),
                    f"{r['file_bytes'] / 1024:.0f}" if r.get("file_bytes") else "-"])
    return table(["model", "blocks", "Set5 PSNR / SSIM", "Set14 PSNR / SSIM", "params", "quantized", "MACs (G)",
                  "file (KB)"], out) + source("ablation_quantsr_plus", a)


def complexity(c: dict[str, Any]) -> list[str]:
    out = []
    for r in c["rows"]:
        fp = r["bits"] == 32
        eq_p = f"{r['equivalent_params'] / 1e3:,.1f}" + ("" if fp else f" (↓{r['params_reduction'] * 100:.1f}%)")
        eq_o = f"{r['equivalent_ops'] / 1e9:,.2f}" + ("" if fp else f" (↓{r['ops_reduction'] * 100:.1f}%)")
        name = "srresnet (MSRResNet)" if r["arch"] == "srresnet" else r["arch"]
        out.append([name, f"{r['bits']}/{r['bits']}", str(r["blocks"]), f"{r['params'] / 1e3:,.0f}",
                    f"{r['quantized_params'] / 1e3:,.0f}", f"{r['macs'] / 1e9:.1f}", eq_p, eq_o,
                    f"{r['paper_params_k']:,} / {r['paper_ops_g']}"])
    return table(["arch", "W/A", "blocks", "params (K)", "quantized (K)", "MACs (G)", "equiv. params (K)",
                  "equiv. ops (G)", "paper params / ops"], out) + source("complexity_x4", c)


def swinir_matmuls(c: dict[str, Any]) -> str:
    r = next(r for r in c["rows"] if r["arch"] == "swinir-s" and r["bits"] == 32 and r["blocks"] == 4)
    total, mm = r["macs"] / 1e9, r["attention_matmul_macs"] / 1e9
    return (f"our {total:.2f} G includes the attention matmuls (q·kᵀ and attn·v, {mm:.2f} G); without them we "
            f"count {total - mm:.2f} G, close to the paper's {r['paper_ops_g']} G")


def packed_sizes(p: dict[str, Any], b: dict[str, Any]) -> list[str]:
    def pct(v: float | None) -> str:
        return NA if v is None else f"+{v} %"

    out = []
    for r in p["rows"]:
        comp = r["compression"]
        comp_text = NA if not comp else ", ".join(f"{v}× ({k.upper()})" for k, v in comp.items() if v is not None)
        out.append([r["model"], pct(r["overhead_pct"]["w2a2"]), pct(r["overhead_pct"]["w4a4"]), comp_text])
    d = b["rows"]["default"]
    out.append(["imdn x4 (the bundled `default`)", NA, f"{d['file_bytes']:,} B",
                f"{b['rows']['imdn_x4']['params'] * 4 / d['file_bytes']:.2f}×"])
    return table(["model", "W2A2 file vs. (quantized·bits/8 + FP·4 + scales)", "W4A4", "compression vs FP32"],
                 out) + source("packed_sizes", p)[:1] + [
        f"<sub>`bench/results/packed_sizes.json` (not recorded) and `bench/results/bundled_models.json`, code "
        f"{version(b['code_version'])}.</sub>"]


def cpu_inference(c: dict[str, Any]) -> list[str]:
    """One table per machine, in the order the runs were recorded."""
    machines: dict[str, list[dict[str, Any]]] = {}
    for r in c["runs"]:
        machines.setdefault(r["machine"]["cpu"], []).append(r)
    out: list[str] = []
    for cpu, runs in machines.items():
        rows = []
        for r in runs:
            s = r["seconds"]
            conv = (f"{r['one_conv_ms']['fp32']} → {r['one_conv_ms']['cpu']} ms ({r['one_conv_speedup']}×)"
                    if r.get("one_conv_ms") else NA)
            rows.append([r["label"], str(r["threads"]), *(NA if s[k] is None else f"{s[k]:.2f} s"
                                                          for k in ("fp32", "fp32_cl", "torch_ref", "cpu")),
                         f"{r['speedup_vs_fp32']:.2f}× ({r['speedup_vs_fp32_cl']:.2f}× vs channels-last)", conv])
        versions = sorted({version(r.get("code_version")) for r in runs})
        out += [f"{cpu}, {runs[0]['machine'].get('cores')} cores, code {', '.join(versions)}:", ""]
        out += table(["model", "threads", "FP32 torch", "FP32 channels-last", "torch reference", "`cpu` backend",
                      "speedup vs FP32", "one 64→64 3×3 conv"], rows) + [""]
    return out + ["<sub>`bench/results/cpu_inference.json`.</sub>"]


QARTSR_LABELS = {"ptq-minmax": "naive PTQ (min-max)",
                 "lsq": "LSQ-style QAT, same parameters, {budget} steps end to end",
                 "rpq-forward": "RPQ forward order (ablation)", "rpq": "RPQ (reverse)", "rpq+et": "RPQ + ET",
                 "trq+rpq+et": "TRQ + RPQ + ET (T={t} selected)"}


def qartsr(q: dict[str, Any]) -> list[str]:
    rows, budget = q["rows"], q["settings"]["budget"]

    def cell(key: str) -> str:
        r = rows.get(key)
        return f"{r['metrics']['Set5']['psnr']:.2f} / {r['metrics']['Set14']['psnr']:.2f}" if r else NA

    fp, bic = cell("fp"), cell("bicubic")
    out = [[f"FP32 ({fp}), bicubic ({bic})", "", ""]]
    for method, label in QARTSR_LABELS.items():
        t = {b: rows.get(f"{method}@w{b}a{b}", {}).get("report", {}).get("trq_selected_timestep") for b in (4, 2)}
        out.append([label.format(budget=budget, t=t[4] if t[4] == t[2] else f"{t[4]}/{t[2]}"),
                    cell(f"{method}@w4a4"), cell(f"{method}@w2a2")])
    return table(["osd-sr-tiny x4, Set5 / Set14 PSNR", "W4A4", "W2A2"], out) + source("qartsr_x4", q)


def qartsr_sweep(q: dict[str, Any]) -> list[str]:
    trq = q["trq"]
    w4 = {r["timestep"]: r for r in trq["sweep_w4a4"]}
    w2 = {r["timestep"]: r for r in trq["sweep_w2a2"]}
    out = []
    for t, r in w4.items():
        fp = trq["fp_eval"].get(str(t))
        amp = r["amplification"]
        out.append([f"{t} ({amp:.3g})" if amp >= 1 else f"{t} ({amp:.2g})", f"{r['zh_rmse']:.3f}",
                    f"{r['image_psnr_vs_fp']:.2f}",
                    f"{r['image_psnr_vs_ref']:.2f}", f"{w2[t]['image_psnr_vs_ref']:.2f}" if t in w2 else NA,
                    f"{fp['Set5']['psnr']:.2f}" if fp else NA])
    return table(["T (amplification)", "z_H RMSE W4A4", "W4A4 PTQ vs own FP", "W4A4 PTQ vs original FP",
                  "W2A2 PTQ vs original FP", "retrained FP, Set5"], out) + source("qartsr_x4", q)


def memory(m: dict[str, Any]) -> list[str]:
    def mb(v: float) -> str:
        return f"{v / 1000:.1f} GB" if v >= 1000 else f"{v:.0f} MB"

    rows = [[r["case"], mb(r["peak_mb"]), mb(r["before_mb"]) if "before_mb" in r else r.get("before", NA)]
            for r in m["rows"]]
    return table(["case", "peak RSS", "before the bound"], rows) + source("memory", m)

"""QArtSR comparison on ``osd-sr-tiny`` (x4): FP, naive PTQ, LSQ-QAT, RPQ (reverse/forward), RPQ+ET, TRQ+RPQ+ET.

One script, one run, one budget: every trained method gets ``--budget`` optimizer steps on the same
calibration patches (T91 + BSD200, fixed seed), distilling the FP model's output; RPQ alone spends the
whole budget on RPQ, the "+ET" variants split it ``--et-frac`` (ET) / rest (RPQ). TRQ's FP retraining
(``--trq-iters`` LoRA steps per candidate timestep, distilling the original model by default) is extra FP
work, reported separately; its timestep is chosen per bit-width by
:func:`quantsr_cli.diffusion.trq.select_timestep` (end-to-end error of the PTQ-initialised retrained
model against the original FP output on the calibration patches; the original T=999 is a candidate).
Results are Y-channel PSNR/SSIM on Set5/Set14 (BasicSR conventions) for W4A4 and W2A2.

Resumable at every level: the FP model's training (``train_osd_tiny`` checkpoints), TRQ-retrained models
(``--state-dir``) and each finished (method, bits) row of ``--out`` are reused when the settings match
(the TRQ settings only gate the ``trq+rpq+et`` rows and the sweeps; the settings include the code version,
``git describe`` + package version, so rows of other code are measured again).
Writes ``bench/results/qartsr_x4.json`` and ``bench/results/qartsr_x4.md``. Several processes may share one
``--out`` (e.g. ``--bits 4`` and ``--bits 2`` on two cores once the FP model exists): each row is merged into
the file under a lock, and each TRQ model is retrained by whichever process gets there first.

Examples::

    python bench/qartsr_compare.py --threads 2 --train-only           # train osd-sr-tiny (resumable)
    python bench/qartsr_compare.py --threads 2                        # train if needed, then compare
    python bench/qartsr_compare.py --threads 1 --bits 4 & python bench/qartsr_compare.py --threads 1 --bits 2
    python bench/qartsr_compare.py --smoke --out /tmp/q.json          # minutes: tiny budgets, 2 images
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from benchinfo import code_version, machine

from quantsr_cli.diffusion.ckpt import load_model, save_model
from quantsr_cli.diffusion.losses import make_perceptual
from quantsr_cli.diffusion.pipeline import QArtSRConfig, run_lsq, run_ptq_minmax, run_qartsr
from quantsr_cli.diffusion.qmodel import QuantSpec, calibrate, quantize_model, set_quant_enabled
from quantsr_cli.diffusion.stages import CalibData, calibration_data
from quantsr_cli.diffusion.train_tiny import TinyTrainOptions, train_osd_tiny
from quantsr_cli.diffusion.trq import TRQ_TARGETS, measure_latent_error, retrain_timestep, select_timestep
from quantsr_cli.engine.evaluate import evaluate_model
from quantsr_cli.engine.modelio import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ptq-minmax", "qartsr-init", "lsq", "rpq-forward", "rpq", "rpq+et", "trq+rpq+et")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.environ.get("QUANTSR_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--model", default=str(ROOT / "runs" / "osd_tiny" / "osd_sr_tiny_x4.safetensors"))
    p.add_argument("--train-iters", type=int, default=2500, help="SR steps when the model must be trained")
    p.add_argument("--ae-iters", type=int, default=400, help="autoencoder warm-up steps (training)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=int, default=300, help="optimizer steps per trained method")
    p.add_argument("--et-frac", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calib-patches", type=int, default=256)
    p.add_argument("--patch", type=int, default=64, help="HR patch side")
    p.add_argument("--trq-timesteps", type=int, nargs="+", default=[999, 899, 499, 1],
                   help="TRQ candidates (the model's own T is used without retraining)")
    p.add_argument("--trq-iters", type=int, default=1000, help="LoRA steps per retrained candidate")
    p.add_argument("--trq-target", choices=TRQ_TARGETS, default="fp",
                   help="TRQ retraining target: the original model's output (fp) or the HR patches (gt)")
    p.add_argument("--lowrank", type=int, default=4)
    p.add_argument("--lora", type=int, default=4)
    p.add_argument("--max-images", type=int, default=0, help="per benchmark (0 = all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", default=str(ROOT / "runs" / "qartsr_bench"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "qartsr_x4.json"))
    p.add_argument("--train-only", action="store_true", help="only train (or finish training) the FP model")
    p.add_argument("--smoke", action="store_true", help="tiny budgets and 2 images per set (wiring check)")
    a = p.parse_args()
    if a.smoke:
        a.budget, a.trq_iters, a.calib_patches, a.max_images = 22, 4, 32, 2
        a.train_iters, a.ae_iters, a.trq_timesteps = min(a.train_iters, 6), min(a.ae_iters, 2), [999, 249]
    return a


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


TRQ_KEYS = ("trq_timesteps", "trq_iters", "trq_target")


def _read(out: Path, settings: dict, trq_settings: dict) -> dict:
    """The results in ``out`` when they were measured with ``settings``, else an empty table.

    Rows of ``trq+rpq+et`` and the TRQ sweeps are kept only when ``trq_settings`` match too (a table
    written before the TRQ settings were separate keeps its other rows).
    """
    results = json.loads(out.read_text()) if out.is_file() else {}
    old = dict(results.get("settings") or {})
    old_trq = results.get("trq_settings") or {k: old.pop(k, None) for k in TRQ_KEYS}
    if {k: v for k, v in old.items() if k not in TRQ_KEYS} != settings:
        return {"settings": settings, "trq_settings": trq_settings, "rows": {}, "trq": {}}
    if old_trq != trq_settings:
        results["rows"] = {k: v for k, v in results.get("rows", {}).items() if not k.startswith("trq+")}
        results["trq"] = {}
    results.update(settings=settings, trq_settings=trq_settings)
    return results


def _commit(out: Path, results: dict, rows: dict | None = None, trq: dict | None = None) -> None:
    """Merge new ``rows``/``trq`` entries into ``out`` (re-read under its lock), write it, and make
    ``results`` the merged table."""
    with _locked(out.with_suffix(".lock")):
        merged = _read(out, results["settings"], results["trq_settings"])
        merged["rows"].update(rows or {})
        merged.setdefault("trq", {}).update(trq or {})
        merged["machine"] = machine()
        _write(out, merged)
    results.clear()
    results.update(merged)


def _write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, out)
    md = out.with_suffix(".md")
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(_markdown(results))
    os.replace(tmp, md)


def _log(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


def _fp_model(a: argparse.Namespace) -> tuple[torch.nn.Module, Path]:
    path = Path(a.model)
    with _locked(path.parent / "train.lock"):  # a second process waits for the first one's training
        if not path.is_file():
            print(f"training osd-sr-tiny into {path.parent} (resumable)", flush=True)
            data = Path(a.data) / "train"
            opts = TinyTrainOptions(iters=a.train_iters, ae_iters=a.ae_iters, threads=a.threads, seed=a.seed,
                                    batch_size=4 if a.smoke else 16)
            trained = train_osd_tiny(path.parent, [data / "T91", data / "BSD200"], opts, log=_log)
            if trained != path:  # the next run must find the model where --model says
                raise SystemExit(f"--model {path}: the trainer writes {trained.name}; name --model so")
    return load_model(path).eval(), Path(path)


def _calib(a: argparse.Namespace) -> CalibData:
    data = Path(a.data) / "train"
    return calibration_data([data / "T91", data / "BSD200"], a.calib_patches, a.patch, a.batch, a.seed)


class TorchBicubic(torch.nn.Module):
    """torch bicubic x4 upsampling: the one-step model's own input, the reference row ``bicubic``."""

    arch, hparams = "bicubic", {"upscale": 4}

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(lr, scale_factor=4.0, mode="bicubic", align_corners=False)


def _eval(model, a: argparse.Namespace) -> dict:
    """Y PSNR/SSIM on Set5/Set14 through ``quantsr eval``'s path (:func:`quantsr_cli.engine.evaluate.evaluate_model`);
    the means are numpy's over the per-image values, as in the committed results."""
    loaded = LoadedModel(model.eval(), str(model.arch), 4, "fp", "bench")
    out = {}
    for name in ("Set5", "Set14"):
        t0 = time.time()
        res = evaluate_model(loaded, str(Path(a.data) / "benchmarks" / name), bicubic=False, max_images=a.max_images)
        values = list(res.images.values())
        out[name] = {"psnr": float(np.mean([v["psnr"] for v in values])),
                     "ssim": float(np.mean([v["ssim"] for v in values])), "images": len(values),
                     "seconds": round(time.time() - t0, 2)}
    return out


def _trq_models(fp, a, data, perceptual, model_sha: str) -> dict[int, torch.nn.Module]:
    """Retrain (or reload) the FP model at each candidate timestep; one process retrains each, the rest wait.

    The model's own timestep maps to the model itself (no retraining)."""
    state = Path(a.state_dir)
    models = {}
    for t in a.trq_timesteps:
        if t == fp.timestep:
            models[t] = fp
            continue
        path = state / f"trq_{model_sha}_T{t}_it{a.trq_iters}_{a.trq_target}_s{a.seed}.safetensors"
        with _locked(path.with_suffix(".lock")):
            if path.is_file():
                models[t] = load_model(path).eval()
                continue
            t0 = time.time()
            torch.manual_seed(a.seed + t)
            models[t] = retrain_timestep(fp, t, data, iters=a.trq_iters, target=a.trq_target, perceptual=perceptual,
                                         log=_log)
            save_model(models[t], path, extra={"trq_seconds": f"{time.time() - t0:.1f}"})
    return models


def _run_method(method, bits, fp, data, a, cfg, trq_models, trq, fp_eval):
    if method == "ptq-minmax":
        return run_ptq_minmax(fp, bits, bits, data, calib_batches=cfg.calib_batches).model, {}
    if method == "qartsr-init":
        qm = copy.deepcopy(fp)
        quantize_model(qm, cfg.quant_spec())
        calibrate(qm, data.calibration_batches(cfg.calib_batches))
        set_quant_enabled(qm, True)
        return qm, {}
    if method == "lsq":  # rpq_iters + et_iters = the budget, all end to end
        res = run_lsq(fp, cfg, data, log=_log)
        return res.model, res.report
    if method in ("rpq", "rpq-forward"):
        c = QArtSRConfig(**{**cfg.__dict__, "rpq_iters": a.budget, "et_iters": 0,
                            "order": "forward" if method == "rpq-forward" else "reverse"})
        res = run_qartsr(fp, c, data, log=_log)
        return res.model, res.report
    c = cfg  # rpq_iters = budget - ET share, et_iters = ET share
    if method == "rpq+et":
        res = run_qartsr(fp, c, data, log=_log)
        return res.model, res.report
    # trq+rpq+et: pick T by the end-to-end error (vs the original FP output) of the PTQ-initialised model
    spec = QuantSpec(w_bits=bits, a_bits=bits, lowrank=a.lowrank, lora=a.lora)
    rows = [measure_latent_error(trq_models[t], spec, data, reference=fp) for t in a.trq_timesteps]
    trq[f"sweep_w{bits}a{bits}"] = rows
    best = select_timestep(rows)
    res = run_qartsr(trq_models[best], c, data, log=_log)
    res.report["trq_selected_timestep"] = best
    res.report["trq_fp"] = fp_eval[str(best)]  # measured once per T in main()
    return res.model, res.report


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    perceptual = make_perceptual("auto")
    fp, fp_path = _fp_model(a)
    if a.train_only:
        return
    # the model's content, not only its path: a model retrained on another machine starts a new table
    model_sha = hashlib.sha256(fp_path.read_bytes()).hexdigest()[:16]
    settings = {"budget": a.budget, "et_frac": a.et_frac, "batch": a.batch, "calib_patches": a.calib_patches,
                "patch": a.patch, "lowrank": a.lowrank, "lora": a.lora, "seed": a.seed, "max_images": a.max_images,
                "model": fp_path.name, "model_sha256": model_sha, "perceptual": perceptual.name,
                "code_version": code_version()}  # rows of another code version are measured again
    trq_settings = {"trq_timesteps": a.trq_timesteps, "trq_iters": a.trq_iters, "trq_target": a.trq_target}
    results = _read(out, settings, trq_settings)
    data = _calib(a)
    for name, model in (("bicubic", TorchBicubic()), ("fp", fp)):
        if name not in results["rows"]:
            _commit(out, results, rows={name: {"metrics": _eval(model, a)}})
    trq_models: dict[int, torch.nn.Module] = {}
    for bits in a.bits:
        et = int(round(a.budget * a.et_frac))
        cfg = QArtSRConfig(w_bits=bits, a_bits=bits, lowrank=a.lowrank, lora=a.lora, calib_batches=8,
                           rpq_iters=a.budget - et, et_iters=et, perceptual="auto")
        for method in a.methods:
            key = f"{method}@w{bits}a{bits}"
            if key in _read(out, settings, trq_settings)["rows"]:  # also rows another process finished meanwhile
                continue
            print(f"== {key}", flush=True)
            if method == "trq+rpq+et" and not trq_models:
                trq_models = _trq_models(fp, a, data, perceptual, model_sha)
                known = results.get("trq", {}).get("fp_eval", {})
                new = {str(t): _eval(m, a) for t, m in trq_models.items() if str(t) not in known}
                if new:
                    _commit(out, results, trq={"fp_eval": {**known, **new}})
            torch.manual_seed(a.seed)
            t0 = time.time()
            trq: dict = {}
            model, report = _run_method(method, bits, fp, data, a, cfg, trq_models, trq,
                                        results.get("trq", {}).get("fp_eval", {}))
            train_s = round(time.time() - t0, 1)
            row = {"metrics": _eval(model, a), "train_seconds": train_s,
                   "report": json.loads(json.dumps(report, default=str))}
            _commit(out, results, rows={key: row}, trq=trq)
    _commit(out, results)
    print(_markdown(results))


def _cell(row: dict | None, ds: str) -> str:
    if not row:
        return "—"
    m = row["metrics"][ds]
    return f"{m['psnr']:.2f} / {m['ssim']:.4f}"


def _psnr(rows: dict, key: str) -> float | None:
    r = rows.get(key)
    return None if r is None else (r["metrics"]["Set5"]["psnr"] + r["metrics"]["Set14"]["psnr"]) / 2


def _markdown(results: dict) -> str:
    s, rows = results.get("settings", {}), results.get("rows", {})
    ts = results.get("trq_settings", {})
    bits = sorted({k.split("@w")[1].split("a")[0] for k in rows if "@w" in k}, reverse=True)
    lines = ["# QArtSR on osd-sr-tiny (x4), Y-channel PSNR (dB) / SSIM", "",
             f"Budget {s.get('budget')} optimizer steps per trained method (batch {s.get('batch')}, "
             f"{s.get('calib_patches')} calibration patches of {s.get('patch')} px); ET share {s.get('et_frac')}; "
             f"TRQ retrains {ts.get('trq_iters')} LoRA steps (target: {ts.get('trq_target')}) per candidate T in "
             f"{ts.get('trq_timesteps')} and keeps the T whose PTQ-initialised model is closest to the original FP "
             f"output on the calibration patches. "
             f"Perceptual term: {s.get('perceptual')}. Eval images per set: {s.get('max_images') or 'all'}.", "",
             "| method | bits | Set5 | Set14 | train s |", "|---|---|---|---|---|"]
    for name in ("bicubic", "fp"):
        lines.append(f"| {name} | 32 | {_cell(rows.get(name), 'Set5')} | {_cell(rows.get(name), 'Set14')} | |")
    for b in bits:
        for m in METHODS:
            r = rows.get(f"{m}@w{b}a{b}")
            if r:
                extra = f" (T={r['report'].get('trq_selected_timestep')})" if m == "trq+rpq+et" else ""
                lines.append(f"| {m}{extra} | W{b}A{b} | {_cell(r, 'Set5')} | {_cell(r, 'Set14')} | "
                             f"{r.get('train_seconds', '')} |")
    lines += ["", "## Expected directions (mean of Set5/Set14 PSNR)", ""]
    for b in bits:
        chain = ["ptq-minmax", "rpq", "rpq+et", "trq+rpq+et"]
        vals = [_psnr(rows, f"{m}@w{b}a{b}") for m in chain]
        pairs = [(chain[i], chain[i + 1], vals[i], vals[i + 1]) for i in range(3)]
        pairs.append(("rpq-forward", "rpq", _psnr(rows, f"rpq-forward@w{b}a{b}"), _psnr(rows, f"rpq@w{b}a{b}")))
        pairs.append(("lsq", "rpq+et", _psnr(rows, f"lsq@w{b}a{b}"), _psnr(rows, f"rpq+et@w{b}a{b}")))
        for lo, hi, x, y in pairs:
            if x is not None and y is not None:
                verdict = "yes" if y > x else "**no**"
                lines.append(f"- W{b}A{b}: {hi} > {lo}? {verdict} ({y:.2f} vs {x:.2f} dB)")
    sweeps = results.get("trq", {})
    fp_eval = sweeps.get("fp_eval", {})
    for key, srows in sorted(sweeps.items()):
        if not key.startswith("sweep_"):
            continue
        lines += ["", f"## TRQ sweep {key[6:]} (denoiser quantized with PTQ init; T=999 is the original model)", "",
                  "Image PSNRs are on the calibration patches: against the same retrained model in FP (quantization "
                  "error alone) and against the original FP model (retraining drift + quantization error: the "
                  "selection criterion). Retrained FP: that model's Set5 PSNR against HR.", "",
                  "| T | sqrt(1-abar)/sqrt(abar) | eps RMSE | z_H RMSE | z_H rel | image PSNR vs own FP | "
                  "image PSNR vs original FP | retrained FP, Set5 |", "|---|---|---|---|---|---|---|---|"]
        for r in srows:
            ev = fp_eval.get(str(r["timestep"]))
            fp_cell = f"{ev['Set5']['psnr']:.2f}" if ev else "—"
            ref = f"{r['image_psnr_vs_ref']:.2f}" if "image_psnr_vs_ref" in r else "—"
            lines.append(f"| {r['timestep']} | {r['amplification']:.3f} | {r['eps_rmse']:.4f} | {r['zh_rmse']:.4f} | "
                         f"{r['zh_rel']:.4f} | {r['image_psnr_vs_fp']:.2f} | {ref} | {fp_cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

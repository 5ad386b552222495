"""Side-by-side comparison of quantization methods on equal terms (same arch, data, seed, budget).

For each arch (``quantsr-c`` from an FP32 model this script trains first, ``imdn`` from the published
FP weights), each method (rbd, rlq, lsq, dorefa, pams) and each bit-width (W2A2, W4A4) at x4, this script trains with
``quantsr quantize``'s engine, packs, and evaluates PSNR/SSIM on Set5 and Set14; it adds FP and
bicubic rows and a QuantSR DQA experiment (one ``--dqa`` model at three depths vs separately trained
models of those depths, all from the FP32 model). Every run lives in ``--work-dir`` and resumes, so the script can be stopped
and restarted; finished runs are not retrained, and each finished row is kept in ``--rows-dir``
(committed) so the comparison also continues in a later session on a fresh machine. Rows and finished runs are
keyed on the code version (``git describe`` + package version): another version's row is measured again
(``--any-version`` reuses it, and the table names each row's version). Results, with the code version and
machine: ``bench/results/methods_x4.json`` and ``bench/results/methods_x4.md``.

    python bench/compare_methods.py                 # the full CPU-sized comparison (hours)
    python bench/compare_methods.py --iters 4 --imdn-iters 2 --blocks 1 --work-dir /tmp/cmp   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from benchinfo import code_version, machine, version_text

from quantsr_cli.config import QuantConfig, TrainConfig
from quantsr_cli.data import shared_data_dir
from quantsr_cli.engine.evaluate import evaluate_model
from quantsr_cli.engine.modelio import load_model
from quantsr_cli.engine.quantize import QuantizeJob, compact_model, run_quantize, write_model_file
from quantsr_cli.engine.report import model_info
from quantsr_cli.quant import METHODS
from quantsr_cli.slim.dqa import DQA_DEPTHS, apply_depth

HERE = Path(__file__).resolve().parent
DATASETS = ("Set5", "Set14")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def evaluate(source: str, depth_keep: list[int] | None = None) -> dict[str, Any]:
    loaded = load_model(source)
    if depth_keep is not None:
        apply_depth(loaded.model, depth_keep)
    out: dict[str, Any] = {}
    for name in DATASETS:
        res = evaluate_model(loaded, name, bicubic=False)
        out[name] = {"psnr": round(res.psnr, 3), "ssim": round(res.ssim, 4)}
    return out


def train(args: argparse.Namespace, name: str, arch: str, quant: QuantConfig, iters: int, *,
          blocks: int | None, init: str | None, patch: int, batch: int, script: str = "bench/compare_methods.py",
          **overrides: Any) -> Path:
    """Train (or resume, or reuse when finished) run ``name`` in ``args.work_dir``; returns its packed file.

    Every run shares Adam 2e-4 with cosine decay, ``args.seed`` and ``args.threads``; ``overrides`` are
    further :class:`TrainConfig` fields (``dqa``, ``distill``, ``slim_to``, ``val_every``, ``val_dataset``).
    """
    run_dir = args.work_dir / name
    out = run_dir / "model.safetensors"
    claim_run_dir(args, run_dir)
    if (run_dir / "summary.json").is_file() and out.is_file():
        log(f"{name}: done, reusing {out}")
        return out
    settings: dict[str, Any] = {"val_every": 0, "val_dataset": ""} | overrides
    cfg = TrainConfig(iters=iters, batch_size=batch, patch_size=patch, lr=2e-4, scheduler="cosine",
                      save_every=max(iters // 10, 1), log_every=max(iters // 20, 1), seed=args.seed,
                      threads=args.threads, **settings)
    job = QuantizeJob(arch=arch, scale=4, quant=quant, train=cfg, init=init, blocks=blocks, run_dir=run_dir,
                      resume=True, command=f"{script} {name}")
    log(f"{name}: training {iters} iterations")
    run_quantize(job)
    return out


def claim_run_dir(args: argparse.Namespace, run_dir: Path) -> None:
    """Mark ``run_dir`` as this code version's; a run (finished or not) of another version is moved aside.

    Its checkpoints would otherwise be resumed, or its model reused, by code that did not train it.
    """
    marker = run_dir / "bench_code_version.json"
    current = code_version()
    if run_dir.is_dir() and not args.any_version:
        saved = json.loads(marker.read_text()) if marker.is_file() else None
        if saved != current:
            stale = run_dir.with_name(run_dir.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            run_dir.rename(stale)
            log(f"{run_dir.name}: trained by code {version_text(saved)}, not {version_text(current)}; moved to {stale}")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(current))


def row(label: str, arch: str, method: str, bits: str, source: str | None, metrics: dict[str, Any]) -> dict[str, Any]:
    info = model_info(source) if source else {}
    return {"label": label, "arch": arch, "method": method, "bits": bits, **metrics,
            "params": info.get("params"), "quantized_params": info.get("quantized_params"),
            "macs_g": round(info["macs"] / 1e9, 2) if info.get("macs") else None,
            "file_bytes": info.get("file_bytes")}


def bicubic_row() -> dict[str, Any]:
    data = shared_data_dir()
    loaded = load_model(str(data / "weights" / "IMDN_x4.pth"))
    metrics = {}
    for name in DATASETS:
        res = evaluate_model(loaded, name, bicubic=True)
        metrics[name] = {"psnr": round(res.bicubic["psnr"], 3), "ssim": round(res.bicubic["ssim"], 4)}
    return {"label": "Bicubic", "arch": "-", "method": "-", "bits": "-", **metrics}


def markdown(rows: list[dict[str, Any]], dqa_rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ("| model | method | W/A | Set5 PSNR | Set5 SSIM | Set14 PSNR | Set14 SSIM | params | quantized | "
            "MACs (G) | file (KB) |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        kb = f"{r['file_bytes'] / 1024:.0f}" if r.get("file_bytes") else "-"
        lines.append(f"| {r['label']} | {r['method']} | {r['bits']} | {r['Set5']['psnr']:.2f} | {r['Set5']['ssim']:.4f} | "
                     f"{r['Set14']['psnr']:.2f} | {r['Set14']['ssim']:.4f} | {r.get('params') or '-'} | "
                     f"{r.get('quantized_params') or '-'} | {r.get('macs_g') or '-'} | {kb} |")
    text = head + "\n".join(lines) + "\n"
    if dqa_rows:
        text += ("\n| DQA (quantsr-c, RBD W4A4) | blocks | Set5 PSNR | Set14 PSNR |\n|---|---|---|---|\n")
        for r in dqa_rows:
            text += f"| {r['label']} | {r['blocks']} | {r['Set5']['psnr']:.2f} | {r['Set14']['psnr']:.2f} |\n"
    if args.missing:
        text += f"\nNot measured yet: {', '.join(args.missing)}.\n"
    versions = sorted(set(args.versions.values()))
    if versions:
        text += f"\nCode version{'s' if len(versions) > 1 else ''} of these rows: {', '.join(versions)}.\n"
    text += (f"\nquantsr-c: {args.blocks} blocks; the FP32 model is trained from scratch for {args.fp_iters} "
             f"iterations and every method (and each DQA row: the DQA model, and separate models from the FP blocks "
             f"their depth keeps) starts from it and trains {args.iters} iterations, batch {args.batch}, HR patch "
             f"{args.patch}; imdn: from the published FP weights, {args.imdn_iters} iterations, batch "
             f"{args.imdn_batch}, HR patch {args.imdn_patch}; Adam 2e-4 cosine, seed {args.seed}, T91+BSD200.\n")
    return text


def measured(args: argparse.Namespace, name: str, settings: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or the value this script measured before under the same ``settings``.

    Each finished row is kept as ``<rows-dir>/<name>.json`` (settings, value, machine, seconds), written
    atomically, so the comparison resumes across sessions and machines that keep only the repository:
    commit ``bench/results/methods_rows/``. Two processes may fill disjoint rows (``--archs imdn`` and
    ``--archs quantsr-c``); a last run with every arch reuses them all and writes the full table.
    """
    path = args.rows_dir / f"{name}.json"
    current = code_version()
    if path.is_file():
        saved = json.loads(path.read_text())
        version = {k: v for k, v in (saved.get("code_version") or {}).items() if k in ("git", "package")}
        if saved.get("settings") == settings and (version == current or args.any_version):
            log(f"{name}: measured before ({path}, code {version_text(version or None)}), reusing")
            args.versions[name] = version_text(version or None)
            return saved["value"]
        why = "other settings" if saved.get("settings") != settings else f"code {version_text(version or None)}"
        log(f"{name}: {path} was measured with {why}; measuring again")
    if args.report_only:
        args.missing.append(name)
        return None
    start = time.time()
    value = compute()
    record = {"settings": settings, "value": value, "seconds": round(time.time() - start, 1),
              "machine": machine(args.threads or None), "code_version": current}
    args.rows_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    args.versions[name] = version_text(current)
    return value


def train_fp(args: argparse.Namespace, arch: str) -> str:
    """The FP32 model every quantized ``arch`` run starts from (trained from scratch for ``--fp-iters``)."""
    return str(train(args, f"{arch}_fp32", arch, QuantConfig("rbd", 32, 32), args.fp_iters,
                     blocks=args.blocks, init=None, patch=args.patch, batch=args.batch))


def dqa_experiment(args: argparse.Namespace, fp_path: str) -> list[dict[str, Any]]:
    """QuantSR DQA: one ``--dqa`` RBD W4A4 model at its three depths vs separately trained models.

    Everything starts from the FP32 model ``fp_path``: the DQA model and the full-depth model (the
    ``rbd_w4a4`` method row) from all of it, each shallower separate model from the FP blocks that
    depth keeps, so the comparison isolates "one model for three depths" against "one model per depth".
    """
    quant = QuantConfig("rbd", 4, 4)
    dqa = train(args, "quantsr-c_dqa_w4a4", "quantsr-c", quant, args.iters, blocks=args.blocks, init=fp_path,
                patch=args.patch, batch=args.batch, dqa=True)
    keep = json.loads(json.dumps(load_model(str(dqa)).meta["extra"]["dqa"]))
    rows: list[dict[str, Any]] = []
    for depth in DQA_DEPTHS:
        n = len(keep[depth])
        rows.append({"label": f"DQA model at {depth} depth", "blocks": n, **evaluate(str(dqa), keep[depth])})
        if n == args.blocks:
            name, init = "quantsr-c_rbd_w4a4", fp_path
        else:
            name, init = f"quantsr-c_rbd_w4a4_b{n}", str(args.work_dir / f"quantsr-c_fp32_keep{n}.safetensors")
            if not Path(init).is_file():
                fp32 = QuantConfig("rbd", 32, 32)
                write_model_file(compact_model(load_model(fp_path).model, fp32, keep[depth]), Path(init), fp32,
                                 {"source": Path(fp_path).name, "kept_blocks": keep[depth]})
        sep = train(args, name, "quantsr-c", quant, args.iters, blocks=n, init=init, patch=args.patch,
                    batch=args.batch)
        rows.append({"label": f"separate {n}-block model", "blocks": n, **evaluate(str(sep))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=HERE / "runs" / "methods")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "methods_x4.json")
    parser.add_argument("--rows-dir", type=Path, default=HERE / "results" / "methods_rows",
                        help="finished rows, reused across sessions (commit it)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--archs", nargs="+", default=["quantsr-c", "imdn"])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--fp-iters", type=int, default=6000,
                        help="iterations of the quantsr-c FP32 model that every quantsr-c method starts from")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--imdn-iters", type=int, default=300)
    parser.add_argument("--imdn-batch", type=int, default=16)
    parser.add_argument("--imdn-patch", type=int, default=128)
    parser.add_argument("--no-dqa", action="store_true")
    parser.add_argument("--dqa-only", action="store_true",
                        help="only the DQA experiment (trains the FP32 model if missing); "
                             "it can run beside a method-rows run once that model exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the rows measured so far and list the missing ones")
    parser.add_argument("--any-version", action="store_true",
                        help="reuse rows and runs measured by another code version (the table names each row's)")
    args = parser.parse_args()
    args.missing = []
    args.versions = {}
    if args.threads:
        torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        sys.exit("no shared data: set QUANTSR_DATA")
    imdn_weights = str(data / "weights" / "IMDN_x4.pth")
    rows: list[dict[str, Any]] = [measured(args, "bicubic", {}, bicubic_row)]
    for arch in ([] if args.dqa_only else args.archs):
        budget = ({"iters": args.imdn_iters, "batch": args.imdn_batch, "patch": args.imdn_patch, "seed": args.seed}
                  if arch == "imdn" else
                  {"iters": args.iters, "batch": args.batch, "patch": args.patch, "seed": args.seed,
                   "blocks": args.blocks})
        if arch == "imdn":
            rows.append(measured(args, "imdn_fp32", {}, lambda: row("IMDN FP32", "imdn", "-", "32/32", imdn_weights,
                                                                   evaluate(imdn_weights))))
        else:
            def fp_row(arch: str = arch) -> dict[str, Any]:
                fp = train_fp(args, arch)
                return row(f"{arch} FP32", arch, "-", "32/32", fp, evaluate(fp))

            budget |= {"fp_iters": args.fp_iters, "start": "fp32"}
            rows.append(measured(args, f"{arch}_fp32", budget, fp_row))
        for bits in args.bits:
            for method in args.methods:
                name = f"{arch}_{method}_w{bits}a{bits}"

                def quant_row(arch: str = arch, method: str = method, bits: int = bits, name: str = name) -> dict[str, Any]:
                    quant = QuantConfig(method, bits, bits)
                    if arch == "imdn":
                        out = train(args, name, arch, quant, args.imdn_iters, blocks=None, init=imdn_weights,
                                    patch=args.imdn_patch, batch=args.imdn_batch)
                    else:
                        out = train(args, name, arch, quant, args.iters, blocks=args.blocks, init=train_fp(args, arch),
                                    patch=args.patch, batch=args.batch)
                    return row(name, arch, method, f"{bits}/{bits}", str(out), evaluate(str(out)))

                rows.append(measured(args, name, budget, quant_row))
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=2))  # partial results survive a stop
    dqa_rows: list[dict[str, Any]] = []
    if args.dqa_only or (not args.no_dqa and "quantsr-c" in args.archs):
        budget = {"iters": args.iters, "batch": args.batch, "patch": args.patch, "seed": args.seed,
                  "blocks": args.blocks, "fp_iters": args.fp_iters, "start": "fp32"}
        dqa_rows = measured(args, "quantsr-c_dqa_w4a4", budget, lambda: dqa_experiment(args, train_fp(args, "quantsr-c")))
    rows = [r for r in rows if r is not None]
    dqa_rows = dqa_rows or []
    if args.missing:
        log(f"not measured yet: {', '.join(args.missing)}")
    result = {"rows": rows, "dqa": dqa_rows, "missing": args.missing, "row_versions": args.versions,
              "settings": {k: v for k, v in vars(args).items() if k != "versions"}
              | {"work_dir": str(args.work_dir), "out": str(args.out), "rows_dir": str(args.rows_dir)},
              "code_version": code_version(), "machine": machine(args.threads or None)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    md = markdown(rows, dqa_rows, args)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""QuantSR+ ablation on equal terms: RBD alone vs RBD+SFD vs RBD+QSA vs RBD+QSA+SFD (seed 000/001).

Arch ``quantsr-c`` x4 at ``--bits`` (default W2A2). An FP teacher with ``--blocks`` residual blocks is
trained first (``quantsr quantize --bits 32``); every student starts from the teacher's weights and
trains for the same ``--iters`` with the same data, seed, batch and patch:

- ``RBD``: the quantized ``--blocks``-block model;
- ``RBD+SFD``: the same with feature distillation from the FP teacher (``--distill``);
- ``RBD+QSA``: QSA removes blocks during training until ``--slim-to`` remain (``--slim-to``);
- ``RBD+QSA+SFD``: both (the full QuantSR+ recipe).

Each row reports Set5/Set14 PSNR/SSIM, params and MACs (3x256x256) of the written packed model.
Every run lives in ``--work-dir`` and resumes; finished runs of the same code version are not retrained
(``--any-version``: of any version). Results, with the code version and machine:
``bench/results/ablation_quantsr_plus.json`` and ``.md``.

    python bench/ablation_quantsr_plus.py --threads 2                     # the CPU-sized ablation
    python bench/ablation_quantsr_plus.py --iters 4 --teacher-iters 4 --blocks 2 --slim-to 1 --work-dir /tmp/abl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from benchinfo import code_version, machine
from compare_methods import evaluate, row  # sibling bench script (``python bench/...`` puts bench/ on sys.path)
from compare_methods import train as train_run

from quantsr_cli.config import QuantConfig
from quantsr_cli.data import shared_data_dir

HERE = Path(__file__).resolve().parent

DEFAULT_FEATURE_WEIGHT = 1e-4
VARIANTS = (("RBD", False, False), ("RBD+SFD", True, False), ("RBD+QSA", False, True), ("RBD+QSA+SFD", True, True))


def train(args: argparse.Namespace, name: str, quant: QuantConfig, iters: int, *, init: str | None,
          distill: str = "", slim_to: int = 0) -> Path:
    """One ablation run through :func:`compare_methods.train` (QSA runs validate on Set5 to pace removals)."""
    return train_run(args, name, "quantsr-c", quant, iters, blocks=args.blocks, init=init, patch=args.patch,
                     batch=args.batch, script="bench/ablation_quantsr_plus.py", distill=distill, slim_to=slim_to,
                     feature_weight=args.feature_weight,
                     val_every=args.val_every if slim_to else 0, val_max_images=0,
                     val_dataset="Set5" if slim_to else "")


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    text = ("| model | blocks | Set5 PSNR / SSIM | Set14 PSNR / SSIM | params | quantized | MACs (G) | file (KB) |\n"
            "|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        kb = f"{r['file_bytes'] / 1024:.0f}" if r.get("file_bytes") else "-"
        text += (f"| {r['label']} | {r['blocks']} | {r['Set5']['psnr']:.2f} / {r['Set5']['ssim']:.4f} | "
                 f"{r['Set14']['psnr']:.2f} / {r['Set14']['ssim']:.4f} | {r.get('params') or '-'} | "
                 f"{r.get('quantized_params') or '-'} | {r.get('macs_g') or '-'} | {kb} |\n")
    text += (f"\nquantsr-c x4, W{args.bits}A{args.bits}, students start from the FP teacher ({args.blocks} blocks, "
             f"{args.teacher_iters} iterations from scratch) and train {args.iters} iterations each; QSA slims "
             f"{args.blocks} → {args.slim_to} blocks (first removal at 20 %, validation every {args.val_every}); "
             f"SFD weight {args.feature_weight:g}; batch {args.batch}, HR patch {args.patch}, Adam 2e-4 cosine, seed {args.seed}, "
             "T91+BSD200.\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=HERE / "runs" / "ablation")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ablation_quantsr_plus.json")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--slim-to", type=int, default=4)
    parser.add_argument("--teacher-iters", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--feature-weight", type=float, default=1e-4,
                        help="SFD weight (released: 1e-4); other values get their own run names and labels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--any-version", action="store_true", help="reuse finished runs of another code version")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if shared_data_dir() is None:
        sys.exit("no shared data: set QUANTSR_DATA")
    teacher = train(args, "teacher_fp32", QuantConfig("rbd", 32, 32), args.teacher_iters, init=None)
    rows = [row("FP32 teacher", "quantsr-c", "-", "32/32", str(teacher), evaluate(str(teacher))) | {"blocks": args.blocks}]
    quant = QuantConfig("rbd", args.bits, args.bits)
    for label, sfd, qsa in VARIANTS:
        name = label.lower().replace("+", "_")
        if sfd and args.feature_weight != DEFAULT_FEATURE_WEIGHT:
            name, label = f"{name}_w{args.feature_weight:g}", f"{label} (w={args.feature_weight:g})"
        out = train(args, name, quant, args.iters, init=str(teacher), distill=str(teacher) if sfd else "",
                    slim_to=args.slim_to if qsa else 0)
        blocks = args.slim_to if qsa else args.blocks
        rows.append(row(label, "quantsr-c", "rbd", f"{args.bits}/{args.bits}", str(out), evaluate(str(out)))
                    | {"blocks": blocks})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2))  # partial results survive a stop
    result = {"rows": rows, "settings": vars(args) | {"work_dir": str(args.work_dir), "out": str(args.out)},
              "code_version": code_version(), "machine": machine(args.threads or None)}
    args.out.write_text(json.dumps(result, indent=2))
    md = markdown(rows, args)
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""``quantsr info``: params, quantized params, MACs, file size and compression of a model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from quantsr_cli.cli.common import JsonOpt, examples, print_json
from quantsr_cli.engine.report import model_info

EXAMPLES = examples("quantsr info default", "quantsr info --arch swinir-s --bits 2 --layers")


def info(
    model: Annotated[str | None, typer.Argument(help="Model file or bundled name (or use --arch).", show_default="none")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="Report an architecture instead of a file.", show_default="none")] = None,
    scale: Annotated[int, typer.Option("--scale", "-s", help="Upscaling factor for --arch.", min=2, max=4)] = 4,
    bits: Annotated[int | None, typer.Option("--bits", help="W/A bits for --arch.", show_default="FP32")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="Blocks for --arch.", show_default="the architecture's")] = None,
    layers: Annotated[bool, typer.Option("--layers", help="Per-layer table.", show_default="off")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Params, quantized params, MACs at 3x256x256, equivalent ops, file size and compression."""
    report = model_info(model, arch=arch, scale=scale, bits=bits, blocks=blocks)
    if not layers:
        report = {k: v for k, v in report.items() if k != "layers"}
    if json_out:
        print_json(report)
        return
    if report.get("detected"):
        Console(stderr=True).print(report["detected"], highlight=False, markup=False, soft_wrap=True)
    console = Console()
    table = Table(title=f"{report['label']} x{report['scale']} W{report['w_bits']}A{report['a_bits']} ({report['kind']})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("params", f"{report['params']:,}")
    table.add_row("quantized params", f"{report['quantized_params']:,}")
    table.add_row("full-precision params", f"{report['fp_params']:,}")
    table.add_row("MACs @ 3x256x256", f"{report['macs'] / 1e9:.2f} G")
    table.add_row("equivalent params (q x bits/32)", f"{report['equivalent_params'] / 1e3:.1f} K (-{report['params_reduction']:.1%})")
    table.add_row("equivalent ops (q x bits/32)", f"{report['equivalent_ops'] / 1e9:.2f} G (-{report['ops_reduction']:.1%})")
    table.add_row("FP32 size", f"{report['fp32_bytes']:,} B")
    if report.get("v_quantizer"):
        table.add_row("attention v quantizer", str(report["v_quantizer"]))
    if report.get("file_bytes"):
        table.add_row("file size", f"{report['file_bytes']:,} B")
        table.add_row("compression vs FP32", f"{report['compression']:.2f}x")
    console.print(table)
    _print_full_precision(console, report)
    if layers:
        lt = Table(title="layers")
        for col in ("name", "type", "shape", "W bits", "A bits", "params", "MACs share"):
            lt.add_column(col, justify="left" if col in ("name", "type", "shape") else "right")
        for r in report["layers"]:
            lt.add_row(r["name"], r["type"], "x".join(map(str, r["shape"])), str(r["w_bits"]), str(r["a_bits"]),
                       f"{r['params']:,}", f"{r['macs_share']:.2%}")
        console.print(lt)


def _print_full_precision(console: Console, report: dict) -> None:
    """What stays full precision, grouped by reason; and the parameters of layers quantsr never packs."""
    groups: dict[str, list[str]] = {}
    for name, reason in (report.get("fp_layers") or {}).items():
        groups.setdefault(reason, []).append(name)
    for reason, names in groups.items():
        shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
        console.print(f"full precision, {reason}: {shown}", highlight=False, markup=False, soft_wrap=True)
    other = report.get("other_fp_params") or {}
    if other:
        listed = ", ".join(f"{kind} {n:,}" for kind, n in sorted(other.items(), key=lambda kv: -kv[1]))
        console.print(f"full precision, not packable (params by module type): {listed}", highlight=False,
                      markup=False, soft_wrap=True)

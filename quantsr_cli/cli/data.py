"""``quantsr data check``: what a data folder holds, one line per dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantsr_cli.cli.common import JsonOpt, examples, log, print_json
from quantsr_cli.data.catalog import check_data_root, known_names
from quantsr_cli.errors import DatasetError
from quantsr_cli.paths import DATA_ENV, data_dir, data_dir_origin, default_data_dir

CHECK_EXAMPLES = examples("quantsr data check", "quantsr data check /data/sr --dataset Set5 --dataset DIV2K --json")

app = typer.Typer(help="The data folder: benchmarks, training sets and weights (layout and sources: docs/data.md).",
                  no_args_is_help=True)


@app.command("check", epilog=CHECK_EXAMPLES)
def check(
    root: Annotated[Path | None, typer.Argument(
        help="Data folder to check.", show_default=f"${DATA_ENV}, else {default_data_dir()}")] = None,
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help=f"Check only this dataset ({', '.join(known_names())}); repeatable. "
        "Exit 1 when one is missing or malformed.", show_default="all")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Say which benchmark and training sets a data folder holds, which are missing and which are malformed."""
    folder = root if root is not None else data_dir()
    origin = "argument" if root is not None else data_dir_origin()
    rows = check_data_root(folder, dataset or ())
    if json_out:
        print_json({"root": str(folder), "origin": origin, "exists": folder.is_dir(),
                    "datasets": [r.to_dict() for r in rows]})
    else:
        how = {"default": f"default; set {DATA_ENV} to use another", "argument": "given"}.get(origin, origin)
        typer.echo(f"data folder: {folder} ({how}{'' if folder.is_dir() else '; does not exist'})")
        width = max(len(r.name) for r in rows)
        for r in rows:
            typer.echo(f"  {r.name:<{width}}  {r.status:<9}  {r.detail}")
    bad = [r for r in rows if r.status == "malformed" or (dataset and r.status != "ok")]
    if bad:
        raise DatasetError(f"{', '.join(f'{r.name} ({r.status})' for r in bad)}; docs/data.md gives the layout "
                           "and where to get each dataset")
    if not folder.is_dir():
        raise DatasetError("data folder not found; create it or set QUANTSR_DATA (docs/data.md)", folder)
    if not json_out:
        present = sum(r.status == "ok" for r in rows)
        log(f"{present} of {len(rows)} present; docs/data.md says where to get the others" if present < len(rows)
            else "everything present")

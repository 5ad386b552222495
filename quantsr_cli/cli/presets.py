"""``quantsr presets``: the bundled training presets, or the options of one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from quantsr_cli.cli.common import JsonOpt, examples, print_json
from quantsr_cli.presets import DESCRIPTION, describe_presets, load_preset

EXAMPLES = examples("quantsr presets", "quantsr presets imdn_x4_w4a4        # its options; train with --preset NAME")


def presets(
    name: Annotated[str | None, typer.Argument(help="A preset whose options to show.",
                                               show_default="none: list every preset")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the bundled training presets with their descriptions, or show one preset's options."""
    if name is not None:
        values = load_preset(name)
        if json_out:
            print_json({"name": name, **values})
            return
        typer.echo(f"{name}: {values.get(DESCRIPTION, '')}")
        for key, value in values.items():
            if key != DESCRIPTION:
                shown = ", ".join(map(str, value)) if isinstance(value, tuple) else value
                typer.echo(f"  {key}: {shown}")
        return
    rows = describe_presets()
    if json_out:
        print_json([{"name": n, "description": d} for n, d in rows])
        return
    table = Table(box=None, show_header=True, pad_edge=False)
    table.add_column("preset", no_wrap=True)
    table.add_column("description")
    for preset, description in rows:
        table.add_row(Text(preset), Text(description))
    Console().print(table)

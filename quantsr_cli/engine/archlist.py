"""The architectures quantsr detects in a checkpoint, from the registries (for ``docs/models.md``).

Built-in architectures come from :data:`quantsr_cli.models.ARCHS`; the foreign ones from the fallback
family's own registry (spandrel's, imported here only when asked).
"""

from __future__ import annotations

from typing import Any

from quantsr_cli.models import ARCHS, build_model


def builtin_architectures() -> list[dict[str, Any]]:
    """The SR architectures quantsr builds itself (detected first), with the layers their rule quantizes."""
    rows = []
    for name, spec in ARCHS.items():
        if spec.fallback or spec.family != "sr":
            continue
        model = build_model(name)
        rows.append({"name": name, "description": spec.description, "quantized": list(model.quant_patterns),
                     "pretrained": spec.pretrained})
    return rows


def foreign_architectures() -> list[dict[str, Any]]:
    """``[{"family": name, "source": "spandrel 0.4.2", "architectures": [...]}]``, one per fallback family."""
    return [{"family": name, **spec.catalog()} for name, spec in ARCHS.items() if spec.fallback and spec.catalog]

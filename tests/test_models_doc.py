"""docs/models.md lists the detected architectures from the registries, not by hand (issue #22)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_models_document_regenerates_from_the_registries() -> None:
    pytest.importorskip("spandrel", reason="the foreign architectures' list comes from spandrel's registry")
    result = subprocess.run([sys.executable, "bench/models_doc.py", "--check"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    text = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    from quantsr_cli.models import ARCHS

    for name, spec in ARCHS.items():
        if spec.family == "sr" and not spec.fallback:
            assert f"| `{name}` |" in text
    for arch in ("ESRGAN", "Compact", "SwinIR", "HAT", "DAT", "RCAN", "SPAN", "OmniSR", "SAFMN", "PLKSR"):
        assert f"`{arch}`" in text

"""Helpers of the robustness corpus: image files and the checks every refused run must pass."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

from .forkcli import Result


def write_png(path: Path, arr: np.ndarray) -> Path:
    """Encode ``arr`` (OpenCV layout) with the extension of ``path`` (any Unicode path)."""
    ok, buf = cv2.imencode(path.suffix, arr)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    buf.tofile(str(path))
    return path


def read_any(path: Path) -> np.ndarray | None:
    """Decode an image file as stored (None when it is not a readable image)."""
    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)


def error_line(result: Result, *needles: str, code: int = 1) -> str:
    """Check a refused run: exit ``code``, no traceback, exactly one ``error:`` line holding every needle.

    Returns the error line.
    """
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def usage_error(result: Result, *needles: str) -> None:
    """A Click/Typer usage error: exit 2, no traceback, the option named."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    flat = " ".join(result.stderr.split())
    for needle in needles:
        assert needle in flat, (needle, result.stderr)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), hidden files included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fresh_dir(path: Path) -> Path:
    """An empty folder at ``path``."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


QUICK_TRAIN = ("--iters", "1", "--val-every", "0", "--patch-size", "16", "--batch-size", "1", "--save-every", "1")
"""Options that make a training command (``quantize``/``slim``/``distill``) finish in about a second."""


def strict_json(text: str):
    """``json.loads`` that refuses ``NaN``/``Infinity``/``-Infinity`` (not JSON; JavaScript's parser throws)."""
    import json

    def refuse(token: str):
        raise ValueError(f"not valid JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def hidden_leftovers(folder: Path) -> list[str]:
    """Files under ``folder`` whose name starts with a dot (temporary files of interrupted writes)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.is_file())

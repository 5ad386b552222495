"""Where quantsr looks for data when no path is given: one answer for every command, never the cwd.

The data folder holds ``benchmarks/`` (Set5, Set14, ...), ``train/`` (T91, BSD200, DIV2K ...), ``val/``
and ``weights/`` (the layout is in ``docs/data.md``). It is ``$QUANTSR_DATA`` when set, else the
platform's per-user data folder:

* Linux and other Unixes: ``$XDG_DATA_HOME/quantsr`` (default ``~/.local/share/quantsr``);
* macOS: ``~/Library/Application Support/quantsr``;
* Windows: ``%LOCALAPPDATA%\\quantsr``.

Nothing here touches the file system beyond ``Path.home()``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_ENV = "QUANTSR_DATA"
"""The environment variable naming the data folder."""


def default_data_dir() -> Path:
    """The per-user data folder used when ``$QUANTSR_DATA`` is not set (see the module docstring)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "quantsr"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "quantsr"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "quantsr"


def data_dir() -> Path:
    """The data folder: ``$QUANTSR_DATA`` when set (``~`` expanded), else :func:`default_data_dir`.

    The folder may not exist; callers that need it say so (and name this path).
    """
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else default_data_dir()


def data_dir_origin() -> str:
    """How :func:`data_dir` was chosen, for messages: ``"$QUANTSR_DATA"`` or ``"default"``."""
    return f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "default"

"""Atomic file writes, their temporary files, and strict JSON: the one implementation every writer uses.

- :func:`atomic_write` writes ``path`` through a hidden temporary file in the same folder
  (``.<name>.<pid>.<8 hex>.tmp``), fsyncs it and renames it into place with ``os.replace``: readers see
  the old file or the new one, never a part. A process killed mid-write leaves only the temporary
  file, which :func:`remove_stale_temp_files` (called by every command before it writes into a folder)
  deletes once its writer is gone.
- :func:`dumps` is ``json.dumps`` that writes non-finite floats as ``null`` (``NaN``/``Infinity`` are
  not JSON) and refuses anything else that is not JSON; :func:`write_json` writes it atomically.

Failures raise ``OSError``; callers turn them into their own error naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["TEMP_NAME", "atomic_write", "write_json", "dumps", "json_safe", "remove_stale_temp_files", "pid_alive"]

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
"""Temporary files of :func:`atomic_write`: hidden, never an image or model extension, so folder listings,
``--skip-existing`` and checkpoint globs never take one for a result."""


def temp_path(path: Path) -> Path:
    """A fresh temporary name for ``path`` (same folder, this process's pid, random suffix)."""
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | Path, data: bytes | Callable[[IO[bytes]], None], fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or a function writing into a binary file object) to ``path`` atomically.

    The final file gets the usual umask permissions. The folder must exist.

    Raises:
        OSError: the folder is missing or unwritable, the disk is full... (``path`` is untouched then).
    """
    path = Path(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        try:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # directories cannot be fsynced on every platform
    return path


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` with non-finite floats replaced by None (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """``json.dumps`` producing valid JSON only: NaN/Infinity become ``null``."""
    if default is not None:  # let ``default`` turn odd values into plain ones first, then clean those
        obj = json.loads(json.dumps(obj, default=default, allow_nan=True))
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as valid JSON (see :func:`dumps`) to ``path`` atomically."""
    return atomic_write(path, (dumps(obj, indent=indent) + "\n").encode("utf-8"))


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this machine (or we cannot tell)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's process, or we cannot tell
    return True


def remove_stale_temp_files(folder: str | Path, names: set[str] | None = None) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder``.

    Only files named like :data:`TEMP_NAME` whose writer process is gone are removed (a concurrent
    writer's temporary file is kept); with ``names``, only those for these final file names.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = TEMP_NAME.match(entry.name)
        if m is None or (names is not None and m.group("name") not in names) or pid_alive(int(m.group("pid"))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed

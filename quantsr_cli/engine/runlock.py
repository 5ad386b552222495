"""One run directory, one writer: the lock every training command holds on its ``--run-dir``.

The lock is the file ``<run_dir>/.quantsr-lock`` holding ``{"pid", "host", "started", "command"}``
and an exclusive ``flock`` on it for as long as the run lives:

- another live process holds it -> :class:`~quantsr_cli.errors.ConfigError` at once, naming that
  process (``in use by process 1234 on host since ...``);
- the file is there but nobody holds it (its process was killed with ``kill -9``, or the machine
  rebooted) -> the lock is stale: it is taken over and ``on_notice`` gets one line saying so;
- the run ends (normally, by an error, or Ctrl-C) -> the file is removed.

The kernel drops an ``flock`` when its process dies, however it dies, so a stale lock can never be
mistaken for a live one (and a recycled pid does not matter). Where ``fcntl`` does not exist, the
recorded pid is checked instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantsr_cli.errors import ConfigError
from quantsr_cli.fileio import pid_alive

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".quantsr-lock"


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {info.get('pid', '?')} on {info.get('host', '?')} (started {when})"


class RunDirLock:
    """Context manager: hold the lock of ``run_dir`` (created if needed) for the ``with`` block."""

    def __init__(self, run_dir: Path, on_notice: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.on_notice = on_notice
        self.fd: int | None = None
        self.created: list[Path] = []  # folders this lock created, deepest first

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _read(self, fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            info = json.loads(os.read(fd, 65536).decode("utf-8", "replace") or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError("--run-dir exists and is not a folder; choose another --run-dir", self.run_dir)
        folder = self.run_dir.absolute()
        while not folder.exists() and folder != folder.parent:
            self.created.append(folder)
            folder = folder.parent
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory ({exc.strerror or exc})", self.run_dir) from None
        for _ in range(100):  # retried only when another process removed the file we opened
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConfigError(f"cannot create the run lock ({exc.strerror or exc})", self.run_dir) from None
            previous = self._read(fd)
            if not self._try_lock(fd, previous):
                os.close(fd)
                raise ConfigError(f"in use by {_describe(previous)}: one run directory, one writer; wait for it "
                                  f"to finish or choose another --run-dir (lock file {LOCK_NAME})", self.run_dir)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except OSError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            break
        else:  # pragma: no cover - only under a storm of concurrent lock removals
            raise ConfigError("could not lock the run directory", self.run_dir)
        if previous.get("pid") and previous.get("pid") != os.getpid() and self.on_notice is not None:
            self.on_notice(f"taking over the stale lock of {self.run_dir}: {_describe(previous)} is no longer running")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(["quantsr", *sys.argv[1:]])[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode("utf-8"))

    def _try_lock(self, fd: int, previous: dict[str, Any]) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
        pid = previous.get("pid")  # pragma: no cover - no flock: trust the recorded pid on this host
        same_host = previous.get("host") == socket.gethostname()
        return not (isinstance(pid, int) and pid != os.getpid() and (pid_alive(pid) or not same_host))

    def release(self) -> None:
        """Remove the lock file (if it is still ours) and, if this run created the folder and left it empty, it."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        for folder in self.created:  # a run refused early leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break

"""Run the real ``quantsr`` entry point in a child process per call, without paying torch's import each time.

A server process (``python -m tests.robustness.forkcli`` style, started by :class:`CliServer`) imports
``quantsr_cli.cli.app`` once and then, for every request, ``fork()``s a child that redirects its file
descriptors 0/1/2 (``/dev/null`` / files), sets ``sys.argv``, the environment and the working
directory, and calls the same ``main()`` that ``python -m quantsr_cli`` and the ``quantsr`` script
call. The child's exit status, stdout and stderr come back exactly as for a fresh interpreter
(an uncaught exception prints its traceback and exits 1, like Python itself).

The server never runs torch code itself (only imports), so forking is safe with OpenMP. Set
``QUANTSR_TEST_NO_FORK=1`` to run every call as a fresh ``python -m quantsr_cli`` instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """What a CLI run left: exit code, stdout and stderr (text)."""

    returncode: int
    stdout: str
    stderr: str


def _child(req: dict, out_path: str, err_path: str) -> None:  # pragma: no cover - runs in the fork
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        sys.argv = ["quantsr", *req["argv"]]
        from quantsr_cli.cli.app import main

        try:
            main()
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:  # pragma: no cover - runs in the server process
    """Read one JSON request per line on stdin, answer one JSON line per request on stdout."""
    import quantsr_cli.cli.app  # noqa: F401  (the import cost is paid once, here)
    import quantsr_cli.quant  # noqa: F401
    import quantsr_cli.packing.io  # noqa: F401
    import quantsr_cli.backends  # noqa: F401

    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing the server imports may write into the protocol stream
    proto.write("ready\n")
    proto.flush()
    for line in sys.stdin:
        req = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            pid = os.fork()
            if pid == 0:
                _child(req, out_path, err_path)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            with open(out_path, encoding="utf-8", errors="replace") as f:
                out = f.read()
            with open(err_path, encoding="utf-8", errors="replace") as f:
                err = f.read()
        proto.write(json.dumps({"returncode": code, "stdout": out, "stderr": err}) + "\n")
        proto.flush()


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI run: ours, one thread, the shared data folder, no QUANTSR_DEBUG."""
    data = os.environ.get("QUANTSR_DATA") or str(REPO.parent / "shared" / "data")  # as tests/conftest.py
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QUANTSR_DATA": data}
    env.pop("QUANTSR_DEBUG", None)
    env.update(extra or {})
    return env


class CliServer:
    """``server(*args, cwd=..., env=...) -> Result``: one CLI run in a fresh child process."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.fork = hasattr(os, "fork") and os.environ.get("QUANTSR_TEST_NO_FORK", "") in ("", "0")

    def _start(self) -> subprocess.Popen[str]:
        env = {**base_env(), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", "from tests.robustness.forkcli import serve; serve()"],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "CLI server did not start"
        return proc

    def __call__(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = 600) -> Result:
        full_env = base_env(env)
        if not self.fork:
            r = subprocess.run([sys.executable, "-m", "quantsr_cli", *args], cwd=cwd or REPO, env=full_env,
                               capture_output=True, text=True, errors="replace", timeout=timeout)
            return Result(r.returncode, r.stdout, r.stderr)
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": list(args), "cwd": str(cwd or REPO), "env": full_env}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("CLI server died")
        return Result(**json.loads(line))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None

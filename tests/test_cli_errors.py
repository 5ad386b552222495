"""Exit codes of ``quantsr``: known errors 1, usage 2, internal errors (bugs) 3, interrupted 130."""

from __future__ import annotations

import errno
import sys

import pytest

from quantsr_cli.cli import app as app_module
from quantsr_cli.cli import info as info_cmd
from quantsr_cli.errors import CheckpointError


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raise_: BaseException,
         debug: bool = False) -> tuple[int, str]:
    """``quantsr info --arch imdn`` with ``raise_`` injected where the command calls the engine."""

    def broken(*args: object, **kwargs: object) -> None:
        raise raise_

    monkeypatch.setattr(info_cmd, "model_info", broken)
    monkeypatch.setattr(sys, "argv", ["quantsr", "info", "--arch", "imdn"])
    if debug:
        monkeypatch.setenv("QUANTSR_DEBUG", "1")
    else:
        monkeypatch.delenv("QUANTSR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        app_module.main()
    return int(exit_info.value.code), capsys.readouterr().err


@pytest.mark.parametrize("exc", [RuntimeError("index 3 is out of bounds"), ValueError("bad"), KeyError("w_q"),
                                 ZeroDivisionError("division by zero")])
def test_an_unexpected_exception_is_an_internal_error_not_a_user_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: Exception) -> None:
    code, err = _run(monkeypatch, capsys, exc)
    assert code == app_module.EXIT_INTERNAL == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("internal error (a bug in quantsr): " + type(exc).__name__)
    assert "QUANTSR_DEBUG=1" in lines[0] and "Traceback" not in err


def test_debug_shows_the_traceback_of_an_internal_error(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(monkeypatch, capsys, RuntimeError("injected"), debug=True)
    assert code == 3 and "Traceback" in err and "RuntimeError: injected" in err and "broken" in err


@pytest.mark.parametrize("exc, needle", [
    (CheckpointError("missing keys body.0.conv1.weight", "w.pth"), "error: w.pth: missing keys body.0.conv1.weight"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.png"), "error: /out/x.png: No space left on device"),
    (MemoryError(), "error: out of memory"),
])
def test_known_and_environment_errors_exit_1_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         exc: BaseException, needle: str) -> None:
    code, err = _run(monkeypatch, capsys, exc)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.strip().startswith(needle), err


def test_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(monkeypatch, capsys, KeyboardInterrupt())
    assert code == 130 and err.strip() == "interrupted"

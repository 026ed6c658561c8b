"""utils/console.py: the console log tee, a console that goes away, durations."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from utils.console import format_duration, setup_console_log


def test_console_log_tees_and_restores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log_path = tmp_path / "logs" / "train.log"
    original_out, original_err = sys.stdout, sys.stderr
    restore = setup_console_log(log_path)
    print("hello log")
    print("to stderr", file=sys.stderr)
    sys.stdout.write("step 1/3\rstep 2/3\rstep 3/3\n")
    sys.stdout.write("windows line\r\n")
    sys.stdout.write("unfinished")
    assert sys.stdout.isatty() == original_out.isatty() and sys.stdout.encoding
    restore()
    restore()  # twice is harmless
    assert sys.stdout is original_out and sys.stderr is original_err
    print("after restore")
    captured = capsys.readouterr()
    assert "hello log" in captured.out and "step 1/3\rstep 2/3" in captured.out and "to stderr" in captured.err
    assert log_path.read_text() == "hello log\nto stderr\nstep 3/3\nwindows line\nunfinished\n"



class _ClosedPipe(io.StringIO):
    """A console whose reader has gone away, as with `python train.py | head -3`."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")



def test_a_closed_console_never_stops_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    log_path = tmp_path / "train.log"
    restore = setup_console_log(log_path)
    print("step 1/3", flush=True)  # raised BrokenPipeError and failed the run before
    print("step 2/3", flush=True)
    restore()
    assert log_path.read_text() == "step 1/3\nstep 2/3\n"



def test_format_duration() -> None:
    assert [format_duration(s) for s in (42, 187, 3720, 59.6, 0)] == ["42s", "3m07s", "1h02m", "1m00s", "0s"]
    assert format_duration(float("inf")) == "?" and format_duration(-1) == "?"

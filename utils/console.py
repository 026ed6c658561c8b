"""Console helpers: mirror stdout/stderr into the run's train.log, and format durations for ETAs.

    restore = setup_console_log(run.log_file())      # runs/<id>/logs/train.log
    ...                                   # everything printed also lands in train.log
    restore()

The tee works at the Python level (sys.stdout/sys.stderr), so output written straight to file
descriptors by C code or child processes reaches the console but not the log.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO


class _LogFile:
    """The log file shared by both streams; takes only whole lines, so the log stays readable.

    A progress line redrawn with "\r" is logged once, in the state it had when its "\n" came.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a crash loses at most the line being written.
        self.file: TextIO | None = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        self.lock = threading.Lock()

    def write_lines(self, pending: str, text: str) -> str:
        """Log the whole lines of pending + text; return the unfinished tail to keep for later."""
        *lines, tail = (pending + text).split("\n")
        if lines and self.file is not None:
            with self.lock:
                self.file.write("".join(_final_state(line) + "\n" for line in lines))
        return tail

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None


def _final_state(line: str) -> str:
    """What a terminal shows for `line` once every "\r" redraw is done (also strips CRLF's "\r")."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


class _Tee:
    """Writes to the console stream and to the shared log; anything else is the console stream's."""

    def __init__(self, stream: TextIO, log: _LogFile, echo: bool = True) -> None:
        self._stream = stream
        self._log: _LogFile | None = log
        self._pending = ""
        self._echo = echo

    def write(self, text: str) -> int:
        if self._echo:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._console_closed()
        if self._log is not None:
            self._pending = self._log.write_lines(self._pending, text)
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._console_closed()

    def _console_closed(self) -> None:
        """The reader went away (`train.py | head -3`): stop echoing, keep logging, and point the
        descriptor at /dev/null so no later flush (ours, or Python's at exit) fails on it."""
        self._echo = False
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real descriptor (e.g. a StringIO)
            pass

    def detach_log(self) -> None:
        """Log the unfinished last line (its final state), then write to the console only."""
        if self._log is not None and _final_state(self._pending):
            self._log.write_lines("", self._pending + "\n")
        self._pending = ""
        self._log = None

    def __getattr__(self, name: str) -> Any:
        # isatty, fileno, encoding, errors, buffer, ...: answer as the real console does, so
        # libraries that probe the stream (colours, progress bars) behave as without the tee.
        return getattr(self._stream, name)


def setup_console_log(log_path: Path, console: bool = True) -> Callable[[], None]:
    """Mirror sys.stdout and sys.stderr into `log_path` (appended, parents created).

    console=False (ranks other than 0 under torchrun) keeps stdout out of the console, so the
    progress lines appear once; stderr still reaches it, so a failing rank is seen.

    Returns a function that undoes it: restores both streams and closes the file. It is safe to call
    twice; if someone replaced sys.stdout after us, theirs is left in place and our tee just stops
    writing to the (closed) file.
    """
    log = _LogFile(Path(log_path))
    originals = {"stdout": sys.stdout, "stderr": sys.stderr}
    tees = {name: _Tee(stream, log, echo=console or name == "stderr") for name, stream in originals.items()}
    sys.stdout, sys.stderr = tees["stdout"], tees["stderr"]

    def restore() -> None:
        for name, tee in tees.items():
            tee.flush()
            tee.detach_log()
            if getattr(sys, name) is tee:
                setattr(sys, name, originals[name])
        log.close()

    return restore


def format_metrics(metrics: dict[str, Any]) -> str:
    """"loss 0.0356, exact_match 0.9752, iteration 800": floats to four decimals, the rest as they are."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def format_duration(seconds: float) -> str:
    """Compact duration for progress and ETA displays: "1h02m", "3m07s", "42s"; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressLine:
    """A progress callback for dataset.prepare: one line rewritten in place on a terminal, a line every
    PLAIN_EVERY seconds otherwise (a log file gets no carriage returns); close() prints the last state
    and ends the line."""
    TTY_EVERY, PLAIN_EVERY = 0.25, 10.0

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream = label, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_print, self.latest, self.shown = time.monotonic(), None, None

    def __call__(self, progress: Any) -> None:
        self.latest = progress
        if time.monotonic() - self.last_print >= (self.TTY_EVERY if self.tty else self.PLAIN_EVERY):
            self._print(progress)

    def _print(self, p: Any) -> None:
        rate = p.text_bytes / p.seconds if p.seconds > 0 else 0.0
        done = p.source_bytes / p.total_bytes if p.total_bytes else 1.0
        eta = p.seconds * (1 - done) / done if done > 0 else None
        line = (f"{self.label}: {100 * done:5.1f}% | {p.text_bytes / 1e6:,.1f} MB of text at {rate / 1e6:,.2f} MB/s | "
                f"{p.documents:,} documents | {p.tokens:,} tokens | ETA {format_duration(eta)}")
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()
        self.last_print, self.shown = time.monotonic(), p

    def close(self) -> None:
        """Print the last state if it has not been, and end the line (only a run that did work prints)."""
        if self.latest is not None and self.latest is not self.shown:
            self._print(self.latest)
        if self.tty and self.shown is not None:
            self.stream.write("\n")
            self.stream.flush()

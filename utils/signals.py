"""Interruption: SIGINT/SIGTERM stop a start-up at once, and let a training step finish before saving.

    with GracefulStop(immediate=True) as stop:   # start-up: a signal raises Interrupted right away
        with stop.deferred(): ...                 # except inside this: it takes effect at the end
        stop.immediate = False                    # the loop: a signal only sets stop.requested

During start-up (tokenizing, building a model) a signal raises Interrupted at once, so nothing long
keeps a process alive that was asked to stop. A few lines must not be cut in half (creating a run
directory, its lock and its status): inside deferred() the signal is held until the block ends.
Once the loop runs, the first signal only sets a flag that the loop reads after each step; it then
writes a checkpoint and the export and exits 130 (SIGINT) or 143 (SIGTERM). A second signal stops at
once with KeyboardInterrupt: checkpoints are written atomically, so the last good one is intact.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator


class Interrupted(BaseException):
    """A signal during start-up. BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way (git metadata, tracking) swallows it."""

    def __init__(self, signum: int, during: str = "during start-up") -> None:
        super().__init__(f"{signal.Signals(signum).name} {during}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, immediate: bool = False, announce: bool = True, during: str = "during start-up") -> None:
        self.signum: int | None = None
        self.immediate = immediate
        self.during = during  # how an immediate stop describes itself: "SIGINT <during>"
        self.announce = announce  # False on torchrun ranks other than 0: the console hears it once
        self._holding = False
        self._ignoring = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + (self.signum or 0)

    def ignore(self) -> None:
        """From now on a signal changes nothing: the work is done and has recorded how it ended."""
        self._ignoring = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self._ignoring:
            return
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        if self._holding:
            return
        if self.immediate:
            raise Interrupted(signum, self.during)
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "and the export (send it again to stop at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a start-up signal until the block is done, then raise it."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
        if self.immediate and self.signum is not None:
            raise Interrupted(self.signum, self.during)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class NeverStop:
    """GracefulStop's no-op twin, for loops run without signal handlers (profile_model.py)."""
    requested = False
    exit_code = 0

"""Graceful interruption: SIGINT/SIGTERM let the current step finish, then the run saves and exits.

The first signal only sets a flag that the training loop reads after each step; the loop then writes
a checkpoint and the export and exits 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once
with KeyboardInterrupt: checkpoints are written atomically, so the last good one is still intact.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class GracefulStop:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + (self.signum or 0)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
              "and the export (send it again to stop at once)", file=sys.stderr, flush=True)

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

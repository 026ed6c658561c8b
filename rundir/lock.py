"""Who owns a run directory, and what state a run is really in, even after a SIGKILL.

    with RunLock(run_dir):              # one writer per run: a second process gets a one-line refusal
        ...
    run_state(run_dir)                  # RunState("killed", "pid 4242 on host a is gone; ...")

A process writing into a run holds an exclusive flock(2) on meta/lock for as long as it lives. The
kernel drops the lock when the process dies, however it dies (SIGKILL, OOM killer, power loss), so
"status.json says running but nobody holds the lock" means the run was killed: no pid that might
have been reused is trusted. A run written from another host cannot be checked that way on every
filesystem, so there its status' heartbeat (updated_at, bumped while it trains) decides: silent for
STALE_AFTER_S, it reads as stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from rundir.run_dir import RunDir
from rundir.status import utc_now

STALE_AFTER_S = 30 * 60


class RunLock:
    """The exclusive lock of one run (or plan) directory; `with RunLock(run_dir):` or acquire()/release()."""

    def __init__(self, run_dir: Path, what: str = "run") -> None:
        self.path = RunDir(run_dir).lock_file
        self.dir = Path(run_dir)
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = lock_owner(self.dir) or {}
            raise ValueError(f"{self.what} '{self.dir}' is in use by pid {owner.get('pid', '?')} on "
                             f"{owner.get('host', '?')} (since {owner.get('since', '?')}); wait for it to end, or "
                             "stop that process first") from None
        # The owner is written into the locked file itself (never replaced: the lock lives on its inode).
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}) + "\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_owner(run_dir: Path) -> dict[str, Any] | None:
    """{"pid", "host", "since"} of the live process holding the run's lock, or None when nobody does."""
    try:
        fd = os.open(RunDir(run_dir).lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}  # held, by a process still writing its name
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunState:
    state: str   # running | completed | failed | interrupted | killed | stale | unreadable
    detail: str  # one line on how that was decided; "" where status.json says it all


def run_state(run_dir: Path, now: float | None = None) -> RunState:
    """The state recorded in meta/status.json, corrected for a process that died without saying so. A
    status.json that exists but cannot be parsed (edited, or cut short by a full disk outside gptlab's
    atomic writes) says nothing about how the run ended: it reads as unreadable, never as killed."""
    run = RunDir(run_dir)
    status = run.status()
    if not status:
        if lock_owner(run_dir) is not None:
            return RunState("running", "starting up: no status yet")
        if run.status_file.exists():
            return RunState("unreadable", "meta/status.json exists but is not a JSON object; how the run ended is "
                                          "unknown")
        return RunState("killed", "stopped before it wrote meta/status.json")
    state = str(status.get("state", "unknown"))
    if state != "running" or lock_owner(run_dir) is not None:
        return RunState(state, "")
    where = f"pid {status.get('pid', '?')} on {status.get('host', '?')}"
    at = f"last recorded at iteration {status.get('iteration', '?')}, {status.get('updated_at', '?')}"
    if status.get("host", socket.gethostname()) == socket.gethostname():
        return RunState("killed", f"{where} is gone without recording an end; {at}")
    silent = (now or time.time()) - _timestamp(status.get("updated_at"))
    if silent > STALE_AFTER_S:
        return RunState("stale", f"{where}: no heartbeat for {silent / 3600:.1f} h; {at}")
    return RunState("running", f"{where} (another host: its heartbeat is recent)")


def _timestamp(iso: Any) -> float:
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return 0.0


"""meta/status.json: how a run is doing, or how it ended, kept current while it trains.

    status = RunStatus(run_dir); status.start(); ...; status.finish("completed", val_loss=1.47)
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rundir.run_dir import RunDir
from utils.files import atomic_write_json


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def _plain(value: Any) -> Any:
    """A JSON-serializable form: tensors and numpy scalars become Python numbers, and a non-finite
    float null (JSON has no Infinity: Node's JSON.parse throws on it, jq reads 1.797e308)."""
    value = value.item() if hasattr(value, "item") and callable(value.item) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value



class RunStatus:
    """meta/status.json, kept current: anyone can `cat` it to see how a run is doing or how it ended.

    Fields: state (running|completed|failed|interrupted), run_dir, pid and host of the process,
    started_at, updated_at (also the heartbeat: bumped while the run trains), finished_at (null while
    running), iteration, any metrics passed in, and "error" on failure. Times are ISO 8601 UTC.
    Every write is atomic. A process that dies without finish() leaves "running": rundir/lock.py
    tells that apart from a live run.
    """

    FINAL_STATES = ("completed", "failed", "interrupted")
    _RESERVED = ("state", "run_dir", "pid", "host", "started_at", "updated_at", "finished_at", "resumed_at")
    HEARTBEAT_S = 60.0

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = RunDir(run_dir).status_file
        self.data: dict[str, Any] = {}
        self.enabled = enabled  # False: the no-op twin (torchrun ranks other than 0, profile_model.py)
        self._written_at = 0.0

    def start(self, **fields: Any) -> None:
        """Mark the run running. On a resumed run the first started_at is kept and resumed_at added."""
        previous = self.read() if self.enabled and self.path.exists() else {}
        now = utc_now()
        self.data = {
            "state": "running", "run_dir": self.run_dir.name, "pid": os.getpid(), "host": socket.gethostname(),
            "started_at": previous.get("started_at", now), "updated_at": now, "finished_at": None, "iteration": 0,
        }
        if previous:
            self.data["resumed_at"] = now
        self._merge(fields)
        self._write()

    def update(self, **fields: Any) -> None:
        """Merge fields (iteration=500, val_loss=1.9, ...) and bump updated_at."""
        self._merge(fields)
        self.data["updated_at"] = utc_now()
        self._write()

    def heartbeat(self, **fields: Any) -> None:
        """update(), at most once per HEARTBEAT_S: cheap enough for every log line."""
        if time.monotonic() - self._written_at >= self.HEARTBEAT_S:
            self.update(**fields)

    def finish(self, state: str, **fields: Any) -> None:
        """End the run as completed, failed (pass error=...) or interrupted."""
        if state not in self.FINAL_STATES:
            raise ValueError(f"run state {state!r} is not one of {', '.join(self.FINAL_STATES)}")
        self._merge(fields)
        now = utc_now()
        self.data.update(state=state, updated_at=now, finished_at=now)
        self._write()

    def read(self) -> dict[str, Any]:
        """The status as last written to disk."""
        return json.loads(self.path.read_text(encoding="utf-8"))

    def _merge(self, fields: dict[str, Any]) -> None:
        clash = [k for k in fields if k in self._RESERVED]
        if clash:
            raise ValueError(f"RunStatus fields {clash} are managed by start/finish and cannot be set directly")
        for key, value in fields.items():
            # A traceback in a status file is unreadable at a glance: keep errors to one line.
            self.data[key] = " ".join(str(value).split())[:1000] if key == "error" else _plain(value)

    def _write(self) -> None:
        if not self.enabled:
            return
        try:
            atomic_write_json(self.path, self.data)
        except OSError as e:  # e.g. a full disk: the status is a record, not a reason to stop training
            print(f"warning: could not update {self.path}: {e.strerror or e}", file=sys.stderr)
        self._written_at = time.monotonic()

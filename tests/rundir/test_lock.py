"""utils/run_state.py: one process per run directory, and a killed run told apart from a live one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO
from rundir.lock import RunLock, RunState, lock_owner, run_state
from rundir.run_dir import RunDir
from rundir.status import RunStatus


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from rundir.lock import RunLock
from rundir.status import RunStatus
run_dir = Path({run_dir!r})
RunLock(run_dir).acquire()
RunStatus(run_dir).start(iteration=7)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_live_run_holds_its_lock_and_a_killed_one_reads_as_killed(tmp_path: Path) -> None:
    """The state another process sees, and the one-line refusal a second writer gets."""
    run_dir = RunDir.create(tmp_path, "live").path
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(repo=str(REPO), run_dir=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert lock_owner(run_dir)["pid"] == proc.pid
        assert run_state(run_dir).state == "running"
        with pytest.raises(ValueError, match=f"is in use by pid {proc.pid} on .*; wait for it to end"):
            RunLock(run_dir).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_owner(run_dir) is None  # the kernel released it with the process
    state = run_state(run_dir)
    assert state.state == "killed" and f"pid {proc.pid}" in state.detail and "iteration 7" in state.detail
    with RunLock(run_dir):  # a dead owner's lock is free to take, with no stale file to clean up
        assert run_state(run_dir).state == "running"
    assert json.loads((run_dir / "meta" / "status.json").read_text())["state"] == "running"  # only read


def test_run_state_of_other_hosts_missing_status_and_ended_runs(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path, "elsewhere").path
    assert run_state(run_dir).state == "killed"  # died before it wrote a status
    with RunLock(run_dir):
        assert run_state(run_dir) == RunState("running", "starting up: no status yet")
    status = RunStatus(run_dir)
    status.start()
    data = {**status.read(), "host": "another-host", "updated_at": "2026-01-01T00:00:00+00:00"}
    (run_dir / "meta" / "status.json").write_text(json.dumps(data))
    now = datetime.fromisoformat("2026-01-01T00:10:00+00:00").timestamp()
    assert run_state(run_dir, now=now).state == "running"  # a recent heartbeat from a host we cannot check
    stale = run_state(run_dir, now=now + 2 * 3600)
    assert stale.state == "stale" and "another-host" in stale.detail
    status.finish("completed")
    assert run_state(run_dir) == RunState("completed", "")


def test_heartbeat_writes_at_most_once_per_interval(tmp_path: Path, monkeypatch) -> None:
    status = RunStatus(RunDir.create(tmp_path, "beat").path)
    status.start()
    status.heartbeat(iteration=1)
    assert status.read()["iteration"] == 0  # just written by start()
    monkeypatch.setattr(RunStatus, "HEARTBEAT_S", 0.0)
    status.heartbeat(iteration=2)
    assert status.read()["iteration"] == 2 and status.read()["pid"] == os.getpid()

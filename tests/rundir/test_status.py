"""rundir/status.py: meta/status.json through a run's life, and across a resume."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from rundir.run_dir import RunDir
from rundir.status import RunStatus


def test_run_status_lifecycle(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path, "status").path
    status = RunStatus(run_dir)
    status.start()
    first = json.loads((run_dir / "meta" / "status.json").read_text())
    assert first["state"] == "running" and first["finished_at"] is None and first["iteration"] == 0
    assert first["run_dir"] == run_dir.name and datetime.fromisoformat(first["started_at"]).tzinfo
    status.update(iteration=500, val_loss=1.9)
    assert status.read()["iteration"] == 500 and status.read()["val_loss"] == 1.9
    status.finish("completed", val_loss=1.5)
    done = status.read()
    assert done["state"] == "completed" and done["finished_at"] and done["val_loss"] == 1.5
    assert done["started_at"] == first["started_at"]

    failed = RunStatus(RunDir.create(tmp_path, "fails").path)
    failed.start(iteration=3)
    failed.finish("failed", error="RuntimeError: boom\n  at line 3")
    assert failed.read()["state"] == "failed" and failed.read()["error"] == "RuntimeError: boom at line 3"
    with pytest.raises(ValueError, match="not one of"):
        failed.finish("exploded")
    assert not list((run_dir / "meta").glob("*.tmp"))



def test_run_status_resume_keeps_started_at(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path, "resume").path
    first = RunStatus(run_dir)
    first.start()
    first.finish("interrupted", iteration=40)
    started = first.read()["started_at"]
    again = RunStatus(run_dir)
    again.start(iteration=40)
    data = again.read()
    assert data["state"] == "running" and data["finished_at"] is None and data["iteration"] == 40
    assert data["started_at"] == started and data["resumed_at"]

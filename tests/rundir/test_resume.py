"""rundir/resume.py: which run and checkpoint --resume continues."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest

from rundir.checkpoint import save_checkpoint
from rundir.lock import RunLock
from rundir.resume import find_resume
from rundir.run_dir import RunDir
from rundir.status import RunStatus
from test_checkpoint import make


def run_with(root: Path, minute: int, cfg, iterations: tuple[int, ...], finish: str | None) -> Path:
    run_dir = RunDir.create(root, "run", now=datetime(2026, 1, 1, 12, minute)).path  # runs in the order of `minute`
    status = RunStatus(run_dir)
    status.start()
    if finish:
        status.finish(finish)
    model, opt, scaler = make(cfg)
    for i in iterations:
        save_checkpoint(run_dir / "artifacts" / "checkpoints", model, opt, scaler, {"iteration": i})
    return run_dir


def test_resume_latest_says_which_run_it_picked_and_refuses_a_running_one(tiny_cfg, tmp_path: Path):
    older = run_with(tmp_path, 1, tiny_cfg, (10,), "completed")
    newest = run_with(tmp_path, 2, tiny_cfg, (), None)  # killed before its first checkpoint
    notes: list[str] = []
    run, ckpt = find_resume("latest", tmp_path, notes)
    assert run.path == older and ckpt.iteration == 10
    assert notes == [f"--resume latest picked {older.name}, the newest run with a checkpoint; newer runs without "
                     f"one: {newest.name} (killed)"]
    running = run_with(tmp_path, 3, tiny_cfg, (5,), None)
    with RunLock(running):
        with pytest.raises(ValueError, match=f"the newest run, '{running}', is still running"):
            find_resume("latest", tmp_path, [])
    notes = []
    find_resume(str(running), tmp_path, notes)  # its owner gone: resumable, and said to be killed
    assert notes and notes[-1].startswith(f"{running.name} was killed: pid {os.getpid()}")

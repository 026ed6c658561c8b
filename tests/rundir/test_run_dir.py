"""rundir/run_dir.py: creating a run directory (the layout, the same second, many processes), finding runs."""

from __future__ import annotations

import multiprocessing as mp
import re
from datetime import datetime
from pathlib import Path

import pytest

from rundir.run_dir import RunDir, find_runs, resolve_run

NOW = datetime(2025, 1, 2, 3, 4, 5)
LAYOUT = ("artifacts/checkpoints", "artifacts/export", "logs/tensorboard", "meta/configs")


def _create_in_child(runs_dir: str, barrier, results) -> None:
    barrier.wait()  # all children call create_run_dir at (nearly) the same instant
    results.put(str(RunDir.create(runs_dir, "race", now=NOW).path))


def test_create_run_dir_layout(tmp_path: Path) -> None:
    run_dir = RunDir.create(tmp_path / "new" / "runs", "tag").path
    assert re.match(r"^\d{8}_\d{6}_tag(-\d+)?$", run_dir.name)
    for sub in LAYOUT:
        assert (run_dir / sub).is_dir(), sub
    assert (run_dir / "meta").is_dir() and (run_dir / "logs").is_dir()


def test_same_second_gets_numbered_suffixes(tmp_path: Path) -> None:
    names = [RunDir.create(tmp_path, "t", now=NOW).path.name for _ in range(3)]
    assert names == ["20250102_030405_t", "20250102_030405_t-2", "20250102_030405_t-3"]


def test_concurrent_processes_get_distinct_dirs(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")  # spawn: no fork of a process that may hold torch/Aim threads
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_create_in_child, args=(str(tmp_path), barrier, results)) for _ in range(8)]
    for p in procs:
        p.start()
    dirs = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(set(dirs)) == 8
    assert all(re.match(r"^20250102_030405_race(-\d+)?$", Path(d).name) for d in dirs)


def _fake_run(runs_dir: Path, name: str, export: bool) -> Path:
    run = runs_dir / name
    (run / "meta").mkdir(parents=True)
    (run / "artifacts" / "export").mkdir(parents=True)
    if export:
        (run / "artifacts" / "export" / "model.safetensors").write_bytes(b"")
    return run


def test_find_runs_order(tmp_path: Path) -> None:
    oldest_first = ["20240101_235959_z", "20250101_000000_a", "20250101_000000_a-2", "20250101_000000_a-10",
                    "20250102_000000_a"]
    for name in reversed(oldest_first):
        _fake_run(tmp_path, name, export=False)
    (tmp_path / "not_a_run").mkdir()
    assert [p.name for p in find_runs(tmp_path)] == oldest_first
    assert find_runs(tmp_path / "missing") == []


def test_resolve_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    with pytest.raises(FileNotFoundError, match="no run with an export in .*train one first"):
        resolve_run("latest", runs)
    old = _fake_run(runs, "20250101_000000_old", export=True)
    newer = _fake_run(runs, "20250101_000000_old-2", export=True)
    running = _fake_run(runs, "20250105_000000_running", export=False)
    assert resolve_run("latest", runs).path == newer
    assert resolve_run("latest", runs, need_export=False).path == running
    assert resolve_run(str(old), runs).path == old
    assert resolve_run(str(old / "artifacts" / "export"), runs).path == old
    assert resolve_run(old.name, runs).path == old
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_run(str(tmp_path / "nope"), runs)
    with pytest.raises(FileNotFoundError, match=r"has no export .*status\.json"):
        resolve_run(str(running), runs)
    assert resolve_run(str(running), runs, need_export=False).path == running



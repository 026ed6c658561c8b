"""Run directories, meta files, status, run lookup, atomic files and the console log (utils/)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from utils.console import format_duration, setup_console_log
from utils.files import atomic_write_bytes, atomic_write_json, sha256_file
from rundir.meta import git_facts, git_summary, write_meta
from rundir.run_dir import RunDir, find_runs, resolve_run
from rundir.status import RunStatus

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


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"]
    cmd = ["git", *identity, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def git_checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("n_layer = 4\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-q", "-m", "first")
    (repo / "model.py").write_text("n_layer = 6\n")
    (repo / "scratch_notes.txt").write_text("untracked\n")
    return repo


def _configs(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "configs" / "model.yaml", tmp_path / "configs" / "train.yaml",
             tmp_path / "presets" / "train.yaml"]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# file {i}\nmax_iters: {i}\n")
    return paths


def test_write_meta_in_git_checkout(tmp_path: Path, git_checkout: Path) -> None:
    run_dir = RunDir.create(tmp_path / "runs", "meta").path
    config = {"n_layer": 6, "dropout": 0.1, "run_tag": "meta", "bias": True}
    configs = _configs(tmp_path)
    write_meta(run_dir, config, configs, git_checkout)
    meta = run_dir / "meta"
    git_txt = (meta / "git.txt").read_text()
    sha = _git(git_checkout, "rev-parse", "HEAD").strip()
    assert f"commit: {sha}" in git_txt and "branch: main" in git_txt and "dirty: True" in git_txt
    assert "scratch_notes.txt" in git_txt
    assert "-n_layer = 4" in git_txt and "+n_layer = 6" in git_txt
    assert git_summary(git_checkout) == {"commit": sha, "branch": "main", "dirty": True}
    env_txt = (meta / "env.txt").read_text()
    import torch

    assert f"torch: {torch.__version__}" in env_txt and "torch==" in env_txt and "python: " in env_txt
    assert json.loads((meta / "full_config.json").read_text()) == config
    copies = sorted(p.name for p in (meta / "configs").iterdir())
    assert copies == ["00_model.yaml", "01_train.yaml", "02_train.yaml"]
    assert [(meta / "configs" / c).read_text() for c in copies] == [p.read_text() for p in configs]


def test_git_facts_before_first_commit_and_detached(tmp_path: Path, git_checkout: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _git(fresh, "init", "-q")
    (fresh / "a.py").write_text("x = 1\n")
    _git(fresh, "add", "a.py")
    text = git_facts(fresh)
    assert "no commits yet" in text and "+x = 1" in text and "dirty: True" in text
    _git(git_checkout, "checkout", "-q", "--detach")
    assert "branch: detached HEAD" in git_facts(git_checkout)


def test_outside_git_checkout(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_facts(plain) == f"not a git checkout: {plain}\n"
    assert git_facts(tmp_path / "missing").startswith("not a git checkout")
    assert git_summary(plain) == {"commit": None, "branch": None, "dirty": None}
    run_dir = RunDir.create(tmp_path / "runs", "nogit").path
    write_meta(run_dir, {"a": 1}, [], plain)
    assert (run_dir / "meta" / "git.txt").read_text().startswith("not a git checkout")


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


def test_atomic_writes(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_bytes(path, b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_bytes() == b"abc" and sorted(os.listdir(tmp_path)) == ["f.json"]


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


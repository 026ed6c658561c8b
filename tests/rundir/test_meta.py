"""rundir/meta.py: what produced a run (git, the environment, the config files, gptlab's source), and saying when the code changed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rundir.meta import git_facts, git_summary, write_meta
from rundir.run_dir import RunDir


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



def test_the_code_that_trained_a_run_is_recorded_and_a_change_is_said(tmp_path: Path, trained_run: Path) -> None:
    """meta/code.json holds a SHA-256 of gptlab's own source; resume, inference and evaluate say so in one line
    when today's source differs (here: a run whose record was edited, as if trained by other code)."""
    import shutil

    from config import PROJECT_DIR
    from conftest import call_main, run_cli
    from rundir.meta import code_note, source_record

    record = json.loads((trained_run / "meta" / "code.json").read_text())
    assert record == source_record(PROJECT_DIR) and record["files"] > 30
    assert code_note(trained_run, PROJECT_DIR) == ""
    run_dir = tmp_path / trained_run.name
    shutil.copytree(trained_run, run_dir)
    (run_dir / "meta" / "code.json").write_text(json.dumps({"sha256": "0" * 64, "files": 1}))
    note = code_note(run_dir, PROJECT_DIR)
    assert note.startswith(f"note: gptlab's code changed since {run_dir.name} was trained (source SHA-256 000000000000 "
                           f"then, {record['sha256'][:12]} now)") and "meta/git.txt has the commit and diff" in note
    res = run_cli("inference.py", "--run", str(run_dir), "--prompt", "All", "--max-new-tokens", "3")
    assert res.returncode == 0 and note in res.stderr, res.stderr
    import train

    res = call_main(train.main, "--resume", str(run_dir), "--max-iters", "21")
    assert res.returncode == 0 and note in res.stdout, res.stderr
    (run_dir / "meta" / "code.json").unlink()  # a run from before the record: nothing to say
    assert code_note(run_dir, PROJECT_DIR) == ""

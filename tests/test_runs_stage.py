"""runs.py: the run listing (killed runs told apart) and clean (a dry run unless --yes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import runs
from model import LanguageModel
from parameters import ModelConfig
from utils.checkpoint import find_checkpoints, mark_best, save_checkpoint
from utils.run_state import RunLock
from utils.runs import RunStatus, create_run_dir


def make_run(root: Path, tag: str, state: str, steps: tuple[int, ...] = (), best: int | None = None) -> Path:
    """A run directory in `state` with checkpoints at `steps` (state "killed": left running, no owner)."""
    run_dir = create_run_dir(root, tag)
    status = RunStatus(run_dir)
    status.start(iteration=max(steps, default=0))
    if state != "killed":
        status.finish(state, best_val_loss=1.5)
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8)
    model = LanguageModel(cfg, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt_dir = run_dir / "artifacts" / "checkpoints"
    for step in steps:
        path = save_checkpoint(ckpt_dir, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                               {"iteration": step})
        if step == best:
            mark_best(ckpt_dir, path, 1.5)
    return run_dir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "done", "completed", (10, 20, 30), best=20)
    make_run(root, "paused", "interrupted", (10, 20, 30), best=10)
    make_run(root, "broke", "failed", (10,))
    make_run(root, "gone", "killed", (10,))
    return root


def names(root: Path) -> dict[str, list[str]]:
    return {p.name.split("_", 2)[2]: [c.name for c in find_checkpoints(p / "artifacts" / "checkpoints")]
            for p in sorted(root.iterdir())}


def test_list_shows_every_run_with_its_real_state(root: Path, capsys):
    assert runs.main(["--runs-dir", str(root), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "state", "steps"]
    states = {line.split()[0].split("_", 2)[2]: line.split()[1] for line in out[1:]}
    assert states == {"done": "completed", "paused": "interrupted", "broke": "failed", "gone": "killed"}
    runs.main(["--runs-dir", str(root), "list", "--state", "killed"])
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["killed"]


def test_clean_is_a_dry_run_until_told_otherwise(root: Path, capsys):
    before = names(root)
    runs.main(["--runs-dir", str(root), "clean"])
    out = capsys.readouterr().out
    assert names(root) == before and "would remove" in out and "run again with --yes" in out
    runs.main(["--runs-dir", str(root), "clean", "--yes"])
    assert names(root) == {"done": ["step_000020"], "paused": ["step_000010", "step_000030"]}
    assert all((p / "artifacts").is_dir() for p in root.iterdir())


def test_clean_leaves_a_run_another_process_holds(root: Path, capsys):
    (busy,) = [p for p in root.iterdir() if p.name.endswith("_done")]
    with RunLock(busy):
        runs.main(["--runs-dir", str(root), "clean", "--yes"])
    assert f"skipped {busy.name}" in capsys.readouterr().out
    assert len(find_checkpoints(busy / "artifacts" / "checkpoints")) == 3


def test_a_missing_runs_directory_is_one_line(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="runs directory .* does not exist"):
        runs.main(["--runs-dir", str(tmp_path / "none"), "list"])

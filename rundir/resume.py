"""Which checkpoint a stage means: --resume RUN|latest (the newest one that verifies), a checkpoint by
name (best, latest, step_N) or by its path.

    point = find_resume("latest", "runs", notes)      # ResumePoint(run, checkpoint): what --resume continues
    path = find_checkpoint(run_dir, "best")           # inference.py and serve.py's --checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from rundir.checkpoint import PREFIX, Checkpoint, best_checkpoint, find_checkpoints, latest_good
from rundir.lock import RunState, run_state
from rundir.run_dir import RunDir, find_runs, resolve_run


def checkpoint_by_path(path: Path, runs_dir: str | Path) -> tuple[RunDir, Path] | None:
    """A path that names one of a run's checkpoints (runs/<id>/artifacts/checkpoints/step_N): its run, and
    the checkpoint (FileNotFoundError naming the ones there when it is gone: rotation removes old ones).
    None for any other path."""
    path = Path(path)
    if len(path.parents) < 3 or RunDir(path.parents[2]).checkpoints != path.parent:
        return None
    run = resolve_run(str(path.parents[2]), runs_dir, need_export=False)
    return run, find_checkpoint(run, path.name)


def find_checkpoint(run_dir: Path | RunDir, name: str) -> Path:
    """A run's checkpoint by name: best, latest (the newest that verifies), step_N or N."""
    ckpt_dir = RunDir(run_dir).checkpoints
    if name == "best":
        path = best_checkpoint(ckpt_dir)
    elif name == "latest":
        path = getattr(latest_good(ckpt_dir), "path", None)
    else:
        digits = name.removeprefix(PREFIX)
        path = ckpt_dir / f"{PREFIX}{int(digits):06d}" if digits.isdigit() else None
    if path is None or not path.is_dir():
        have = ", ".join(p.name for p in find_checkpoints(ckpt_dir)) or "none"
        raise FileNotFoundError(f"run '{run_dir}' has no checkpoint '{name}' (it has: {have}); use best, latest "
                                "or one of those")
    return path


class ResumePoint(NamedTuple):
    run: RunDir
    checkpoint: Checkpoint  # the newest one that verifies


def find_resume(spec: str, runs_dir: str | Path, notes: list[str]) -> ResumePoint:
    """The run and its newest good checkpoint for --resume RUN|latest. Lines for the user go to notes: the
    damaged checkpoints skipped, how the run ended (e.g. killed), and for latest which run it picked and why."""
    if spec != "latest":
        run, skipped = resolve_run(spec, runs_dir, False), []
        ckpt = latest_good(run.checkpoints, skipped)
        if not ckpt:
            raise FileNotFoundError(f"run '{run}' has no usable checkpoint to resume from"
                                    + (f" ({'; '.join(skipped)})" if skipped else "") + "; start a new run")
        notes += [*skipped, *_state_note(run, run_state(run.path))]
        return ResumePoint(run, ckpt)
    newer: list[str] = []
    for run in reversed(find_runs(runs_dir)):
        state = run_state(run.path)
        if state.state == "running" and not newer:
            why = state.detail or "its lock is held"
            raise ValueError(f"--resume latest: the newest run, '{run}', is still running ({why}); pass --resume "
                             "with the run directory you mean")
        skipped: list[str] = []
        ckpt = latest_good(run.checkpoints, skipped)
        if ckpt:
            if newer:
                notes.append(f"--resume latest picked {run.name}, the newest run with a checkpoint; newer runs "
                             f"without one: {', '.join(newer)}")
            notes += [*skipped, *_state_note(run, state)]
            return ResumePoint(run, ckpt)
        newer.append(f"{run.name} ({state.state})")
    raise FileNotFoundError(f"no run with a checkpoint in '{runs_dir}/': nothing to resume")


def _state_note(run: RunDir, state: RunState) -> list[str]:
    return [f"{run.name} was {state.state}: {state.detail}"] if state.state in ("killed", "stale") else []

"""RunDir: one run's directory, runs/<YYYYMMDD_HHMMSS>_<tag>/. It owns the layout: every path inside a
run is spelled here and nowhere else, and it reads back what a run recorded.

    run = RunDir.create("runs", "baseline")          # runs/20250101_120000_baseline/, its folders made
    run.status_file, run.checkpoints, run.export, run.log_file(rank=0), ...
    run.status(), run.config(), run.eval_records()   # what the run recorded ({} where it is missing)
    resolve_run("latest", "runs")                    # the newest run with an export, as a RunDir
    find_runs("runs")                                # every run, oldest first

    runs/<id>/
      meta/         status.json, full_config.json, git.txt, env.txt, code.json, init_from.json, configs/, lock
      logs/         train.log (train.rank<N>.log), tensorboard/, metrics.jsonl
      artifacts/    checkpoints/step_NNNNNN/, export/ (model.safetensors, config.json, tokenizer.json, hf/)
      evals/        <timestamp>_<name>.json

What is inside checkpoints/ and export/ belongs to rundir/checkpoint.py and rundir/export.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from utils.files import atomic_write_json, read_json_object, writable_dir

_RUN_NAME = re.compile(r"^(\d{8}_\d{6})_(.+?)(?:-(\d+))?$")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory, and typed readers of what it recorded."""
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # meta/: what produced the run, and how it is doing
    @property
    def meta(self) -> Path:
        return self.path / "meta"

    @property
    def status_file(self) -> Path:
        return self.meta / "status.json"

    @property
    def config_file(self) -> Path:
        return self.meta / "full_config.json"

    @property
    def git_file(self) -> Path:
        return self.meta / "git.txt"

    @property
    def env_file(self) -> Path:
        return self.meta / "env.txt"

    @property
    def code_file(self) -> Path:
        return self.meta / "code.json"

    @property
    def init_source_file(self) -> Path:
        return self.meta / "init_from.json"

    @property
    def config_copies(self) -> Path:
        return self.meta / "configs"

    @property
    def lock_file(self) -> Path:
        return self.meta / "lock"

    # logs/
    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def tensorboard(self) -> Path:
        return self.logs / "tensorboard"

    @property
    def metrics_file(self) -> Path:
        return self.logs / "metrics.jsonl"

    def log_file(self, rank: int = 0) -> Path:
        """The console log: rank 0's train.log, another rank's train.rank<N>.log."""
        return self.logs / ("train.log" if rank == 0 else f"train.rank{rank}.log")

    # artifacts/ and evals/
    @property
    def checkpoints(self) -> Path:
        return self.path / "artifacts" / "checkpoints"

    @property
    def export(self) -> Path:
        return self.path / "artifacts" / "export"

    @property
    def export_weights(self) -> Path:
        return self.export / "model.safetensors"

    @property
    def evals(self) -> Path:
        return self.path / "evals"

    # readers: {} (or []) for what is missing or unreadable
    def status(self) -> dict[str, Any]:
        return read_json_object(self.status_file)

    def config(self) -> dict[str, Any]:
        return read_json_object(self.config_file)

    def code(self) -> dict[str, Any]:
        return read_json_object(self.code_file)

    def eval_records(self) -> list[Path]:
        """evals/*.json, oldest first."""
        return sorted(self.evals.glob("*.json"))

    def has_export(self) -> bool:
        return self.export_weights.is_file()

    def write_config(self, config: dict) -> None:
        """meta/full_config.json (again, on a resume that changed e.g. max_iters)."""
        atomic_write_json(self.config_file, config)

    @staticmethod
    def looks_like_one(path: Path) -> bool:
        """A folder with meta/ or artifacts/ inside: a run directory (or one still being created)."""
        return (Path(path) / "meta").is_dir() or (Path(path) / "artifacts").is_dir()

    @classmethod
    def create(cls, runs_dir: str | Path, tag: str, now: datetime | None = None) -> "RunDir":
        """Create runs_dir/<YYYYMMDD_HHMMSS>_<tag>[-N]/ with its whole layout."""
        run = cls(create_dir(runs_dir, tag, now))
        for sub in (run.checkpoints, run.export, run.tensorboard, run.config_copies):
            sub.mkdir(parents=True)
        return run


def create_dir(parent: str | Path, tag: str, now: datetime | None = None) -> Path:
    """Create parent/<YYYYMMDD_HHMMSS>_<tag>[-N]/ (a run's, or a plan's) and return it.

    os.mkdir is atomic and fails if the name exists, so two processes started in the same second
    can never both claim a name: the loser moves on to "-2", "-3", ...
    """
    parent = writable_dir(parent, "--runs-dir")
    name = f"{(now or datetime.now()):%Y%m%d_%H%M%S}_{tag}"
    try:
        for n in range(1, 10_000):
            path = parent / (name if n == 1 else f"{name}-{n}")
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"could not find a free run directory name for {parent / name}")
    except OSError as e:  # e.g. a read-only filesystem, or a name the filesystem refuses
        raise ValueError(f"cannot create the run directory '{parent / name}': {e.strerror or e}") from None


def _run_sort_key(run_dir: Path) -> tuple[str, str, int]:
    """Chronological order: timestamp, then tag, then the "-N" suffix as a number.

    Plain string order would put "x-10" before "x-2"; the base name sorts first as suffix 1.
    """
    m = _RUN_NAME.match(run_dir.name)
    if not m:
        return ("", run_dir.name, 0)
    return (m[1], m[2], int(m[3]) if m[3] else 1)


def find_runs(runs_dir: str | Path) -> list[RunDir]:
    """Run directories (those with a meta/ folder) under runs_dir, oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [RunDir(p) for p in runs_dir.iterdir() if RunDir(p).meta.is_dir()]
    return sorted(runs, key=lambda r: _run_sort_key(r.path))


def resolve_run(spec: str, runs_dir: str | Path, need_export: bool = True) -> RunDir:
    """Turn "latest", a run directory, a run name under runs_dir, or a run's artifacts/export
    directory into the run directory. Raises FileNotFoundError naming what is missing and what to do.
    """
    if spec == "latest":
        return _latest_run(Path(runs_dir), need_export)
    run = RunDir(_run_dir_from_path(Path(spec), Path(runs_dir)))
    if need_export and not run.has_export():
        raise FileNotFoundError(
            f"run '{run}' has no export ({run.export_weights.relative_to(run.path).as_posix()}): it may still be "
            f"running or have failed; see {run.status_file}"
        )
    return run


def _latest_run(runs_dir: Path, need_export: bool) -> RunDir:
    runs = [r for r in find_runs(runs_dir) if not need_export or r.has_export()]
    if not runs:
        what = "run with an export" if need_export else "run"
        raise FileNotFoundError(f"no {what} in '{runs_dir}/': train one first with `python train.py`")
    return runs[-1]


def _run_dir_from_path(path: Path, runs_dir: Path) -> Path:
    if not path.exists() and (runs_dir / path).exists():
        path = runs_dir / path  # a bare run name, as `ls runs` prints it
    if not path.exists():
        raise FileNotFoundError(f"run '{path}' not found: pass a run directory ({runs_dir}/<run>) or 'latest'")
    if path.name == "export" and path.parent.name == "artifacts":
        path = path.parent.parent
    if not RunDir.looks_like_one(path):
        raise FileNotFoundError(f"'{path}' is not a run directory (no meta/ or artifacts/ inside it)")
    return path

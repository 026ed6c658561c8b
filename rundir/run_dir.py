"""Run directories: create one per run, record what produced it, keep its status, find it again.

    run_dir = create_run_dir("runs", "baseline")       # runs/20250101_120000_baseline/
    write_meta(run_dir, cfg.to_dict(), config_files, project_dir)
    status = RunStatus(run_dir); status.start(); ...; status.finish("completed", val_loss=1.47)
    resolve_run("latest", "runs")                       # newest run with an export

The layout is described in the README ("Runs"); every file under meta/ is written atomically.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text, writable_dir

RUN_SUBDIRS = ("artifacts/checkpoints", "artifacts/export", "logs/tensorboard", "meta/configs")
EXPORT_FILE = Path("artifacts") / "export" / "model.safetensors"
# `git diff <tree>` against the empty tree shows every tracked file of a repo with no commits yet.
EMPTY_TREE_SHA = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
_RUN_NAME = re.compile(r"^(\d{8}_\d{6})_(.+?)(?:-(\d+))?$")


def create_run_dir(runs_dir: str | Path, tag: str, now: datetime | None = None,
                   subdirs: tuple[str, ...] | None = None) -> Path:
    """Create runs_dir/<YYYYMMDD_HHMMSS>_<tag>[-N]/ with its whole layout (or these subdirs); return its path.

    os.mkdir is atomic and fails if the name exists, so two processes started in the same second
    can never both claim a name: the loser moves on to "-2", "-3", ...
    """
    runs_dir = writable_dir(runs_dir, "--runs-dir")
    name = f"{(now or datetime.now()):%Y%m%d_%H%M%S}_{tag}"
    try:
        for n in range(1, 10_000):
            run_dir = runs_dir / (name if n == 1 else f"{name}-{n}")
            try:
                os.mkdir(run_dir)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"could not find a free run directory name for {runs_dir / name}")
        for sub in RUN_SUBDIRS if subdirs is None else subdirs:
            (run_dir / sub).mkdir(parents=True)
    except OSError as e:  # e.g. a read-only filesystem, or a name the filesystem refuses
        raise ValueError(f"cannot create the run directory '{runs_dir / name}': {e.strerror or e}") from None
    return run_dir


def _open_repo(path: str | Path) -> Any:
    """The git.Repo containing `path`; GitPython is imported here because it costs start-up time."""
    import git  # raises ImportError when no git executable is installed

    return git.Repo(path, search_parent_directories=True)


def _git_head(repo: Any) -> tuple[str | None, str | None]:
    """(commit sha or None before the first commit, branch name or "detached HEAD")."""
    commit = repo.head.commit.hexsha if repo.head.is_valid() else None
    branch = "detached HEAD" if repo.head.is_detached else repo.active_branch.name
    return commit, branch


def git_facts(path: str | Path) -> str:
    """Text for meta/git.txt: commit, branch, dirty flag, untracked files and the full diff vs HEAD.

    "dirty" follows git's own meaning (tracked files changed, staged or not); untracked files are
    listed by name but their contents are not part of the diff. Never raises: outside a checkout, or
    without git, the text says so and training goes on.
    """
    try:
        repo = _open_repo(path)
        commit, branch = _git_head(repo)
        diff = repo.git.diff("HEAD" if commit else EMPTY_TREE_SHA)
        untracked = repo.untracked_files
        lines = [
            f"repository: {repo.working_tree_dir}",
            f"commit: {commit or 'none (no commits yet)'}",
            f"branch: {branch}",
            f"dirty: {bool(diff)}",
            f"untracked files ({len(untracked)}):",
            *(f"  {name}" for name in untracked),
            "",
            f"diff against {'HEAD' if commit else 'the empty tree'} (staged + unstaged):",
            diff,
        ]
        return "\n".join(lines) + "\n"
    except Exception as e:  # noqa: BLE001 - meta is best-effort; a git problem must not stop training
        return f"not a git checkout: {path}{_git_reason(e)}\n"


def _git_reason(e: Exception) -> str:
    """Empty for the ordinary 'not a repository' case; otherwise why git could not be asked."""
    if type(e).__name__ in ("InvalidGitRepositoryError", "NoSuchPathError"):
        return ""
    return f" ({type(e).__name__}: {' '.join(str(e).split())[:300]})"


def git_summary(path: str | Path) -> dict[str, Any]:
    """{"commit", "branch", "dirty"} for tracker params; all None outside a checkout. Never raises."""
    try:
        repo = _open_repo(path)
        commit, branch = _git_head(repo)
        dirty = bool(repo.git.diff("HEAD" if commit else EMPTY_TREE_SHA, "--name-only"))
        return {"commit": commit, "branch": branch, "dirty": dirty}
    except Exception:  # noqa: BLE001 - same best-effort rule as git_facts
        return {"commit": None, "branch": None, "dirty": None}


def env_facts() -> str:
    """Text for meta/env.txt: interpreter, platform, torch and its devices, installed packages."""
    import torch

    lines = [
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"platform: {platform.platform()} ({platform.machine()})",
        f"torch: {torch.__version__}",
        f"torch.version.cuda: {torch.version.cuda}",
        f"cuda available: {torch.cuda.is_available()}",
        *_cuda_devices(torch),
        f"mps available: {torch.backends.mps.is_available()}",
        f"cpu count: {os.cpu_count()}",
        f"torch threads: {torch.get_num_threads()}",
        "",
        "installed packages:",
        *_installed_packages(),
    ]
    return "\n".join(lines) + "\n"


def _cuda_devices(torch: Any) -> list[str]:
    if not torch.cuda.is_available():
        return []
    lines = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"cuda:{i}: {torch.cuda.get_device_name(i)} (capability {major}.{minor})")
    return lines


def _installed_packages() -> list[str]:
    """Sorted, de-duplicated "name==version" lines of every distribution on sys.path."""
    dists = importlib.metadata.distributions()
    return sorted({f"{d.metadata['Name']}=={d.version}" for d in dists if d.metadata["Name"]}, key=str.lower)


def write_meta(run_dir: Path, config: dict, config_files: list[Path], project_dir: Path) -> None:
    """Write meta/git.txt, env.txt, full_config.json and copies of the merged config files.

    Copies are named "<NN>_<name>" with NN the merge order, so two files with the same name
    (configs/train.yaml and a preset train.yaml) both survive and `ls` shows the precedence.
    """
    meta = Path(run_dir) / "meta"
    (meta / "configs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta / "git.txt", git_facts(project_dir))
    atomic_write_text(meta / "env.txt", env_facts())
    atomic_write_json(meta / "full_config.json", config)
    for i, src in enumerate(config_files):
        src = Path(src)
        atomic_write_bytes(meta / "configs" / f"{i:02d}_{src.name}", src.read_bytes())


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
    Every write is atomic. A process that dies without finish() leaves "running": utils/run_state.py
    tells that apart from a live run.
    """

    FINAL_STATES = ("completed", "failed", "interrupted")
    _RESERVED = ("state", "run_dir", "pid", "host", "started_at", "updated_at", "finished_at", "resumed_at")
    HEARTBEAT_S = 60.0

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "meta" / "status.json"
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


def _run_sort_key(run_dir: Path) -> tuple[str, str, int]:
    """Chronological order: timestamp, then tag, then the "-N" suffix as a number.

    Plain string order would put "x-10" before "x-2"; the base name sorts first as suffix 1.
    """
    m = _RUN_NAME.match(run_dir.name)
    if not m:
        return ("", run_dir.name, 0)
    return (m[1], m[2], int(m[3]) if m[3] else 1)


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories (those with a meta/ folder) under runs_dir, oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p for p in runs_dir.iterdir() if (p / "meta").is_dir()]
    return sorted(runs, key=_run_sort_key)


def resolve_run(spec: str, runs_dir: str | Path, need_export: bool = True) -> Path:
    """Turn "latest", a run directory, a run name under runs_dir, or a run's artifacts/export
    directory into the run directory. Raises FileNotFoundError naming what is missing and what to do.
    """
    if spec == "latest":
        return _latest_run(Path(runs_dir), need_export)
    run_dir = _run_dir_from_path(Path(spec), Path(runs_dir))
    if need_export and not (run_dir / EXPORT_FILE).is_file():
        raise FileNotFoundError(
            f"run '{run_dir}' has no export ({EXPORT_FILE.as_posix()}): it may still be running or "
            f"have failed; see {run_dir / 'meta' / 'status.json'}"
        )
    return run_dir


def _latest_run(runs_dir: Path, need_export: bool) -> Path:
    runs = [r for r in find_runs(runs_dir) if not need_export or (r / EXPORT_FILE).is_file()]
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
    if not ((path / "meta").is_dir() or (path / "artifacts").is_dir()):
        raise FileNotFoundError(f"'{path}' is not a run directory (no meta/ or artifacts/ inside it)")
    return path

"""meta/: what produced a run, recorded when it starts: git, the environment, the config files, and a
hash of gptlab's own source, so that a later resume, inference or evaluation can say the code changed.

    write_meta(run_dir, cfg.to_dict(), config_files, project_dir)
    code_note(run_dir, project_dir)     # "" or one line: the source differs from what trained the run
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

from rundir.run_dir import RunDir
from utils.files import atomic_write_bytes, atomic_write_json, atomic_write_text


# `git diff <tree>` against the empty tree shows every tracked file of a repo with no commits yet.
EMPTY_TREE_SHA = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"



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
    metadata = (d.metadata for d in importlib.metadata.distributions())  # each parsed once: 0.07 s, not 0.2
    return sorted({f"{m['Name']}=={m['Version']}" for m in metadata if m["Name"]}, key=str.lower)



def write_meta(run_dir: Path, config: dict, config_files: list[Path], project_dir: Path) -> None:
    """Write meta/git.txt, env.txt, full_config.json, code.json and copies of the merged config files.

    Copies are named "<NN>_<name>" with NN the merge order, so two files with the same name
    (configs/train.yaml and a preset train.yaml) both survive and `ls` shows the precedence.
    """
    run = RunDir(run_dir)
    run.config_copies.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.git_file, git_facts(project_dir))
    atomic_write_text(run.env_file, env_facts())
    atomic_write_json(run.config_file, config)
    atomic_write_json(run.code_file, source_record(project_dir))
    for i, src in enumerate(config_files):
        src = Path(src)
        atomic_write_bytes(run.config_copies / f"{i:02d}_{src.name}", src.read_bytes())


# What counts as gptlab's code: its Python files, not the tests, benchmarks or anything a run writes.
SOURCE_SKIPPED = ("tests", "benchmarks", "runs", "data", ".venv", ".git")


def source_record(project_dir: Path) -> dict[str, Any]:
    """{"sha256", "files"}: one SHA-256 over gptlab's Python source (each file's path and bytes, in order)."""
    project_dir, files = Path(project_dir), []
    for root, dirs, names in os.walk(project_dir):
        top = Path(root) == project_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")) and not (top and d in SOURCE_SKIPPED))
        files += [Path(root) / n for n in names if n.endswith(".py")]
    files.sort()
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(project_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest(), "files": len(files)}


def code_note(run_dir: Path, project_dir: Path) -> str:
    """One line when gptlab's source now differs from the source that trained the run ("" when it is the
    same, or when the run predates the record): results may then differ from the run's own."""
    then = RunDir(run_dir).code()
    if not then.get("sha256"):
        return ""
    now = source_record(project_dir)
    if now["sha256"] == then["sha256"]:
        return ""
    return (f"note: gptlab's code changed since {RunDir(run_dir).name} was trained (source SHA-256 "
            f"{then['sha256'][:12]} then, {now['sha256'][:12]} now); {RunDir(run_dir).git_file} has the commit and "
            "diff it ran")

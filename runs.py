"""See the runs under runs/, and clean up after them.

    python runs.py list [--state killed] [--tag baseline]   # one line per run, oldest first
    python runs.py clean                                     # what would be removed (a dry run)
    python runs.py clean --yes                               # remove it

A run's state comes from meta/status.json, corrected by utils/run_state.py: a process that died
without saying so (SIGKILL, out of memory, power loss) reads as killed. clean removes failed and
killed runs, and the checkpoints nobody needs: a completed run keeps its export and its best
checkpoint; an interrupted one also keeps its newest, so it can still resume. Running runs and runs
another process holds are left alone.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from config import Parser
from utils.checkpoint import best_checkpoint, find_checkpoints, latest_good
from utils.cli import run_main
from utils.files import read_json_object
from utils.run_state import RunLock, run_state
from utils.runs import find_runs

REMOVED_STATES = ("failed", "killed")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", "--runs_dir", default="runs", help="where the runs are (default runs)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="one line per run: name, state, progress, best val loss, started")
    listing.add_argument("--state", help="only runs in this state (running, completed, interrupted, failed, killed, stale)")
    listing.add_argument("--tag", help="only runs with this tag")
    clean = verbs.add_parser("clean", help="remove failed and killed runs and unneeded checkpoints (dry run by default)")
    clean.add_argument("--yes", action="store_true", help="remove them; without it, only say what would go")
    return parser.parse_args(argv)


def list_runs(runs_dir: Path, state: str | None, tag: str | None) -> None:
    rows = []
    for run_dir in find_runs(runs_dir):
        meta = run_dir / "meta"
        status, config = read_json_object(meta / "status.json"), read_json_object(meta / "full_config.json")
        current = run_state(run_dir).state
        if (state and current != state) or (tag and config.get("run_tag") != tag):
            continue
        best = status.get("best_val_loss")
        rows.append((run_dir.name, current, f"{status.get('iteration', '?')}/{config.get('max_iters', '?')}",
                     f"{best:.4f}" if isinstance(best, (int, float)) else "-", str(status.get("started_at", "-"))))
    if not rows:
        print(f"no runs in '{runs_dir}'" + (" match" if state or tag else ""))
        return
    header = ("run", "state", "steps", "best val", "started (UTC)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def cleanup_plan(run_dir: Path) -> list[tuple[Path, str]]:
    """(path to remove, why) for one run; nothing for a run that is running or stale."""
    state = run_state(run_dir).state
    if state in REMOVED_STATES:
        return [(run_dir, f"the run {state}")]
    if state not in ("completed", "interrupted"):
        return []
    ckpt_dir = run_dir / "artifacts" / "checkpoints"
    keep = {best_checkpoint(ckpt_dir)}
    if state == "interrupted":
        keep.add(getattr(latest_good(ckpt_dir)[0], "path", None))  # what --resume needs
    return [(path, f"an old checkpoint of a {state} run") for path in find_checkpoints(ckpt_dir) if path not in keep]


def clean(runs_dir: Path, really: bool) -> None:
    freed = 0
    for run_dir in find_runs(runs_dir):
        plan = cleanup_plan(run_dir)
        if not plan:
            continue
        try:  # a run another process holds (e.g. resuming it right now) is not touched
            lock = RunLock(run_dir).acquire()
        except ValueError as e:
            print(f"skipped {run_dir.name}: {e}")
            continue
        try:
            for path, why in plan:
                size = size_of(path)
                freed += size
                print(f"{'removed' if really else 'would remove'} {path} ({size / 1e6:,.1f} MB): {why}")
                if really:
                    shutil.rmtree(path)
        finally:
            lock.release()
    verb = "freed" if really else "would free"
    print(f"{verb} {freed / 1e6:,.1f} MB" + ("" if really or not freed else "; run again with --yes to remove it"))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory '{runs_dir}' does not exist; pass --runs-dir")
    if args.verb == "list":
        list_runs(runs_dir, args.state, args.tag)
    else:
        clean(runs_dir, args.yes)
    return 0


if __name__ == "__main__":
    run_main(main)

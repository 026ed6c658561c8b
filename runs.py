"""See the runs under runs/, compare them, and clean up after them.

    python runs.py list [--state killed] [--tag baseline] [--sort best_val]   # one line per run
    python runs.py show latest                               # everything meta/ and status.json know
    python runs.py diff runs/<a> runs/<b>                    # config keys and code that differ
    python runs.py plot runs/<a> runs/<b> --out loss.png     # val and train loss against tokens seen
    python runs.py leaderboard [--sort hellaswag_val] [--glob '*lr*'] [--format markdown|csv]   # runs x benchmarks
    python runs.py list --sweep runs/sweeps/<id>             # a sweep's trials (also leaderboard --sweep)
    python runs.py clean                                     # what would be removed (a dry run)
    python runs.py clean --yes                               # remove it

A run's state comes from meta/status.json, corrected by rundir/lock.py: a process that died
without saying so (SIGKILL, out of memory, power loss) reads as killed. clean removes failed and
killed runs, and the checkpoints nobody needs: a completed run keeps its export and its best
checkpoint; an interrupted one also keeps its newest, so it can still resume. Running runs and runs
another process holds are left alone.
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import json
import math
import shutil
import sys
from datetime import datetime
from pathlib import Path

from config import PROJECT_DIR, Parser, add_fields
from evaluation.leaderboard import AVERAGE, benchmark_records, build_board, render, sort_board
from evaluation.likelihood import ACCURACIES
from parameters import ModelConfig
from rundir.checkpoint import best_checkpoint, find_checkpoints, latest_good
from utils.cli import run_main
from rundir.export import MANIFEST, verify_export
from utils.files import atomic_path, read_json_object
from rundir.lock import RunLock, run_state
from utils.console import format_duration, format_metrics
from rundir.run_dir import RunDir, find_runs, resolve_run

REMOVED_STATES = ("failed", "killed")
STATES = ("running", "completed", "interrupted", "failed", "killed", "stale", "unreadable")  # rundir/lock.py


COLUMNS = ("run", "tag", "state", "arch", "params", "tokens", "best_val", "val_bpb", "wall", "started")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser, ("runs_dir",))
    verbs = parser.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="one line per run: id, tag, state, arch, params, tokens seen, best val "
                                            "loss, val bpb, wall time, start")
    listing.add_argument("--state", choices=STATES, help="only runs in this state")
    listing.add_argument("--tag", help="only runs with this tag")
    listing.add_argument("--sweep", help="only the trials of this sweep (runs/sweeps/<id>, or its name)")
    listing.add_argument("--sort", default="started", choices=COLUMNS, help="the column to sort by (default started)")
    listing.add_argument("--reverse", action="store_true", help="largest (or latest) first")
    show = verbs.add_parser("show", help="everything a run's meta/ and status.json know, and its evals")
    show.add_argument("run", help="a run directory, its name under --runs-dir, or latest")
    plot = verbs.add_parser("plot", help="val and train loss against tokens seen, several runs on one chart (PNG)")
    plot.add_argument("runs", nargs="+", help="run directories, their names, or latest")
    plot.add_argument("--out", required=True, help="the PNG file to write")
    diff = verbs.add_parser("diff", help="the config keys and the code that differ between two runs")
    diff.add_argument("a", help="a run directory, its name, or latest")
    diff.add_argument("b", help="a run directory, its name, or latest")
    board = verbs.add_parser("leaderboard", help="one table of the runs with benchmark scores: run, arch, params, "
                                                 "tokens seen, val bpb, each benchmark's metric, the mean centred one")
    board.add_argument("--sort", default=AVERAGE, help=f"a column to rank by, best first (default {AVERAGE}; a "
                                                       "benchmark's name, val_bpb, params, ...)")
    board.add_argument("--reverse", action="store_true", help="worst first")
    board.add_argument("--tag", help="only runs with this tag")
    board.add_argument("--sweep", help="only the trials of this sweep (runs/sweeps/<id>, or its name)")
    board.add_argument("--glob", help="only runs whose name matches this pattern, e.g. '2026*_lr*'")
    board.add_argument("--metric", choices=ACCURACIES, help="the accuracy multiple-choice columns show (default: "
                                                            "acc_norm, lm-eval's; a last word always shows acc)")
    board.add_argument("--format", default="text", choices=("text", "markdown", "csv"), help="how to write it")
    clean = verbs.add_parser("clean", help="remove failed and killed runs and unneeded checkpoints (dry run by default)")
    clean.add_argument("--yes", action="store_true", help="remove them; without it, only say what would go")
    return parser.parse_args(argv)


def run_facts(run: RunDir) -> dict:
    """One run's row: the values list shows and sorts (None where the run does not say)."""
    status, config = run.status(), run.config()
    iteration = status.get("iteration") if isinstance(status.get("iteration"), int) else None
    return {"run": run.name, "tag": config.get("run_tag"), "state": run_state(run.path).state,
            "arch": config.get("arch", "gpt2"), "params": _number(status.get("params")),
            "tokens": iteration * tokens_per_step(config, status) if iteration is not None else None,
            "best_val": _number(status.get("best_val_loss")), "val_bpb": _number(status.get("val_bpb")),
            "wall": _number(status.get("seconds")) or _seconds_between(status.get("started_at"),
                                                                       status.get("finished_at") or status.get("updated_at")),
            "started": status.get("started_at"),
            # a sweep's trial: the sweep directory's name (status.json's sweep.dir), for --sweep
            "sweep": Path(str(status["sweep"].get("dir", ""))).name if isinstance(status.get("sweep"), dict) else None}


def in_sweep(fact: dict, sweep: str | None) -> bool:
    """Whether a run is a trial of the sweep (its directory or name); True when no sweep is asked for."""
    return not sweep or fact["sweep"] == Path(sweep.rstrip("/")).name


def tokens_per_step(config: dict, status: dict) -> int:
    """Tokens one optimizer step trained on, every rank's (ModelConfig.tokens_per_step x world_size)."""
    return (config.get("batch_size", 0) * config.get("grad_accum_steps", 1) * config.get("block_size", 0)
            * status.get("world_size", 1))


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _seconds_between(start: object, end: object) -> float | None:
    try:
        return (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
    except ValueError:
        return None


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "params":
        return f"{value / 1e6:.2f}M"
    if key == "tokens":
        return f"{value:,}"
    if key in ("best_val", "val_bpb"):
        return f"{value:.4f}"
    if key == "wall":
        return format_duration(value)
    return str(value)


def list_runs(runs_dir: Path, state: str | None, tag: str | None, sort: str = "started", reverse: bool = False,
              sweep: str | None = None) -> None:
    facts = [f for f in map(run_facts, find_runs(runs_dir))
             if not (state and f["state"] != state) and not (tag and f["tag"] != tag) and in_sweep(f, sweep)]
    if not facts:
        print(f"no runs in '{runs_dir}'" + (" match" if state or tag or sweep else ""))
        return
    # Runs without the value sort last either way.
    facts.sort(key=lambda f: (f[sort] is None, f[sort] if f[sort] is not None else 0), reverse=False)
    if reverse:
        present = [f for f in facts if f[sort] is not None]
        facts = present[::-1] + [f for f in facts if f[sort] is None]
    header = ("run", "tag", "state", "arch", "params", "tokens", "best val", "val bpb", "wall", "started (UTC)")
    rows = [tuple(_cell(k, f[k]) for k in COLUMNS) for f in facts]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


BOARD_FACTS = ("run", "arch", "params", "tokens", "val_bpb")


def leaderboard(runs_dir: Path, args: argparse.Namespace) -> None:
    """The runs (by --tag, --glob) that have a benchmark score, one row each, ranked by --sort."""
    records, facts = [], []
    for run in find_runs(runs_dir):
        if args.glob and not fnmatch.fnmatch(run.name, args.glob):
            continue
        scores, fact = benchmark_records(run), run_facts(run)
        if scores and not (args.tag and fact["tag"] != args.tag) and in_sweep(fact, args.sweep):
            records.append(scores)
            facts.append(fact)
    if not records:
        print(f"no run in '{runs_dir}'{' that matches' if args.tag or args.glob or args.sweep else ''} has a benchmark "
              "score: score one with python evaluate.py --run R --data FILE.jsonl, or train with --eval-tasks "
              "FILE.jsonl")
        return
    board = build_board(records, [{k: f[k] for k in BOARD_FACTS} for f in facts], args.metric)
    sort_board(board, args.sort, args.reverse)
    print(render(board, args.format, _board_cell))
    for note in board.notes:
        print(f"note: {note}", file=sys.stderr)


def _board_cell(key: str, value: object) -> str:
    if value is None or key in COLUMNS:
        return _cell(key, value)
    return f"{value:.4f}" if key == AVERAGE else f"{value:.2%}"


def show(run: RunDir) -> None:
    """The run's state, status, config, code, environment, checkpoints, export and evals."""
    state = run_state(run.path)
    print(f"run {run}\nstate: {state.state}" + (f" ({state.detail})" if state.detail else ""))
    print(f"\nstatus ({_shown(run, run.status_file)}):")
    for key, value in run.status().items():
        print(f"  {key}: {value}")
    print(f"\nconfig ({_shown(run, run.config_file)}; * differs from the default):")
    defaults = ModelConfig().to_dict()
    for key, value in run.config().items():
        print(f"  {'*' if defaults.get(key, value) != value else ' '} {key}: {value}")
    git = _text(run.git_file)
    print(f"\ncode ({_shown(run, run.git_file)}): " + ("; ".join(git.split("\n")[1:4]) if git.startswith("repository")
                                                      else git.strip() or "not recorded"))
    env = _text(run.env_file).splitlines()
    print(f"environment ({_shown(run, run.env_file)}): " + ("; ".join(line.strip() for line in env[:4]) or "not recorded"))
    ckpts, best = find_checkpoints(run.checkpoints), best_checkpoint(run.checkpoints)
    print(f"checkpoints: {', '.join(p.name + (' (best)' if p == best else '') for p in ckpts) or 'none'}")
    print(f"export: {run.export if (run.export / MANIFEST).is_file() else 'none'}")
    evals = run.eval_records()
    print(f"evals: {len(evals)}" + "".join(f"\n  {p.name}: {_eval_line(p)}" for p in evals))


def _shown(run: RunDir, path: Path) -> str:
    return path.relative_to(run.path).as_posix()


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


def _eval_line(path: Path) -> str:
    return format_metrics({k: v for k, v in read_json_object(path).items() if isinstance(v, (int, float, str))})


def diff(a: RunDir, b: RunDir) -> None:
    """Config keys that differ, then the code: each run's commit and its uncommitted changes."""
    configs = [r.config() for r in (a, b)]
    keys = sorted(set(configs[0]) | set(configs[1]))
    changed = [k for k in keys if configs[0].get(k) != configs[1].get(k) and k != "run_tag"]
    print(f"a: {a}\nb: {b}\n\nconfig: " + (f"{len(changed)} key(s) differ" if changed else "the same"))
    for key in changed:
        print(f"  {key}: {configs[0].get(key, '(absent)')!r} -> {configs[1].get(key, '(absent)')!r}")
    gits = [_text(r.git_file) for r in (a, b)]
    commits = [_git_field(g, "commit") for g in gits]
    print(f"\ncode: commit {commits[0]} -> {commits[1]}" if commits[0] != commits[1] else f"\ncode: commit {commits[0]} in both")
    if commits[0] != commits[1] and all(commits):
        print(_commit_diff(commits[0], commits[1]))
    uncommitted = [g.split("(staged + unstaged):\n", 1)[-1] if "(staged + unstaged):" in g else "" for g in gits]
    if uncommitted[0] == uncommitted[1]:
        print("uncommitted changes: " + ("the same in both" if uncommitted[0].strip() else "none in either"))
    else:
        lines = difflib.unified_diff(uncommitted[0].splitlines(), uncommitted[1].splitlines(), "a: uncommitted diff",
                                     "b: uncommitted diff", lineterm="")
        print("uncommitted changes differ (a diff of the two recorded diffs):\n" + "\n".join(lines))


CURVES = {"val": "eval_loss/val", "train": "loss/train"}


def loss_curves(run_dir: Path | RunDir) -> dict[str, tuple[list[float], list[float]]]:
    """{"val": (tokens seen, losses), "train": (...)} from logs/metrics.jsonl, or from the TensorBoard
    events of a run that predates it (steps times the run's tokens per step)."""
    run = RunDir(run_dir)
    curves: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in CURVES}
    metrics = run.metrics_file
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if not isinstance(record, dict) or not isinstance(record.get("tokens_seen"), (int, float)):
                continue  # not a line train.py wrote
            for name, tag in CURVES.items():
                if isinstance(record.get(tag), (int, float)) and not isinstance(record[tag], bool):
                    curves[name][0].append(record["tokens_seen"])
                    curves[name][1].append(record[tag])
        return curves
    per_step = tokens_per_step(run.config(), run.status())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    for name, tag in CURVES.items():
        if tag in events.Tags().get("scalars", []):
            points = events.Scalars(tag)
            curves[name] = ([p.step * per_step for p in points], [p.value for p in points])
    return curves


def plot(run_dirs: list[Path], out: Path) -> None:
    """One chart: each run a colour, val loss solid with markers, train loss thin and dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out} must be a .png file")
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    drawn, empty = 0, []
    for i, run_dir in enumerate(run_dirs):
        curves, color = loss_curves(run_dir), f"C{i % 10}"
        for name, style in (("val", {"marker": "o", "linewidth": 2}), ("train", {"linestyle": "--", "linewidth": 1})):
            tokens, losses = curves[name]
            if tokens:
                ax.plot(tokens, losses, color=color, label=f"{run_dir.name} {name}", **style)
                drawn += 1
        if not any(tokens for tokens, _ in curves.values()):
            empty.append(run_dir.name)
    if not drawn:
        raise ValueError(f"none of {', '.join(str(r) for r in run_dirs)} has logged a loss yet; train first")
    ax.set(xlabel="tokens seen", ylabel="loss (nats per token)", title="loss against tokens seen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    runs = f"{len(run_dirs) - len(empty)} of {len(run_dirs)} runs" if empty else f"{len(run_dirs)} runs"
    print(f"wrote {out} ({drawn} curves from {runs})" + (f"; no loss logged yet in {', '.join(empty)}" if empty else ""))


def _git_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(f"{name}: "):
            return line.split(": ", 1)[1]
    return None


def _commit_diff(a: str, b: str) -> str:
    """`git diff --stat a b` in this checkout, or why not."""
    try:
        import git

        return git.Repo(PROJECT_DIR, search_parent_directories=True).git.diff("--stat", a, b)
    except Exception as e:  # noqa: BLE001 - the commits may be gone, or git missing: say so, go on
        return f"(no diff of the commits here: {type(e).__name__}: {' '.join(str(e).split())[:200]})"


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def has_verified_export(run: RunDir) -> bool:
    """Whether the run's export is whole: every file matches export.json."""
    try:
        return verify_export(run.export)
    except (ValueError, FileNotFoundError):
        return False


def cleanup_plan(run: RunDir) -> list[tuple[Path, str]]:
    """(path to remove, why) for one run; nothing for a run that is running, stale or unreadable. A failed
    or killed run goes whole, unless it has a verified export: then only the checkpoints that an
    interrupted run would lose go (it keeps its best and its newest)."""
    state = run_state(run.path).state
    if state in REMOVED_STATES and not has_verified_export(run):
        return [(run.path, f"a {state} run")]
    if state not in ("completed", "interrupted", *REMOVED_STATES):
        return []
    ckpt_dir = run.checkpoints
    keep = {best_checkpoint(ckpt_dir)}
    if state != "completed":
        keep.add(getattr(latest_good(ckpt_dir), "path", None))  # what --resume needs
    return [(path, f"an old checkpoint of a {state} run") for path in find_checkpoints(ckpt_dir) if path not in keep]


def clean(runs_dir: Path, really: bool) -> None:
    freed, removed = 0, 0
    for run in find_runs(runs_dir):
        state = run_state(run.path)
        if state.state == "unreadable":
            print(f"kept {run.name}: {state.detail}; look at it and remove it yourself if it should go")
            continue
        plan = cleanup_plan(run)
        if not plan:
            continue
        try:  # a run another process holds (e.g. resuming it right now) is not touched
            lock = RunLock(run.path).acquire()
        except ValueError as e:
            print(f"skipped {run.name}: {e}")
            continue
        try:
            for path, why in plan:
                size = size_of(path)
                freed, removed = freed + size, removed + 1
                print(f"{'removed' if really else 'would remove'} {path} ({format_bytes(size)}): {why}")
                if really:
                    shutil.rmtree(path)
        finally:
            lock.release()
    if not removed:
        print(f"nothing to clean in '{runs_dir}': no failed or killed runs, no old checkpoints")
        return
    verb = "freed" if really else "would free"
    print(f"{verb} {format_bytes(freed)}" + ("" if really else "; run again with --yes to remove it"))


def format_bytes(n: int) -> str:
    """1.5 kB, 12.3 MB, 2.0 GB: a size as people read it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    runs_dir = Path(args.runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"runs directory '{runs_dir}' does not exist; pass --runs-dir")
    if args.verb == "list":
        list_runs(runs_dir, args.state, args.tag, args.sort, args.reverse, args.sweep)
    elif args.verb == "show":
        show(resolve_run(args.run, runs_dir, need_export=False))
    elif args.verb == "plot":
        plot([resolve_run(r, runs_dir, need_export=False).path for r in args.runs], Path(args.out))
    elif args.verb == "leaderboard":
        leaderboard(runs_dir, args)
    elif args.verb == "diff":
        diff(resolve_run(args.a, runs_dir, need_export=False), resolve_run(args.b, runs_dir, need_export=False))
    else:
        clean(runs_dir, args.yes)
    return 0


if __name__ == "__main__":
    run_main(main)

"""An evaluation's record in its run: evals/<timestamp>_<name>.json, and its scalars tracked under
eval/<name>/ in the run's TensorBoard (and its Aim run, when it has one), through the Tracker.

    path = save_eval(run_dir, record)      # record: run, data, split, name, iteration, the metrics
"""

from __future__ import annotations

import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from rundir.run_dir import RunDir
from rundir.tracking import AimTracker, MultiTracker, TensorBoardTracker, Tracker
from utils.files import atomic_write_json

METRICS = ("loss", "perplexity", "bits_per_byte", "top1_accuracy", "top5_accuracy", "exact_match",
           # benchmarks (evaluation/likelihood.py)
           "acc", "acc_norm", "acc_bytes", "acc_per_token", "acc_centered", "acc_norm_centered", "acc_bytes_centered",
           "acc_per_token_centered")


def default_name(data: str) -> str:
    """An evaluation's name from what it scored: the data's file or directory name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.rstrip("/")).name.split(".")[0]) or "data"


def save_eval(run_dir: Path | RunDir, record: dict, track: bool = True) -> Path:
    """evals/<timestamp>_<name>.json (two in one second keep both), then the run's trackers (track=False:
    the training run itself, whose trackers logged the numbers already)."""
    run, name = RunDir(run_dir), record["name"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    path, n = run.evals / f"{stamp}_{name}.json", 2
    while path.exists():
        path, n = run.evals / f"{stamp}_{name}-{n}.json", n + 1
    record = {**record, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, record)
    if not track:
        return path
    with eval_tracker(run) as tracker:
        tracker.log_eval(record.get("iteration") or 0, name, {k: record[k] for k in METRICS if k in record})
    return path


def eval_tracker(run: RunDir) -> Tracker:
    """The run's TensorBoard, and its own Aim run when it trained with one. A missing Aim repo or run is a
    note, not a failure: the JSON has it all."""
    trackers: list[Tracker] = [TensorBoardTracker(run.tensorboard)]
    aim_hash = run.status().get("aim_run_hash")
    if aim_hash:
        try:
            trackers.append(AimTracker(run.config().get("aim_repo", "."), "gptlab", run_hash=aim_hash,
                                       start_new=False))
        except Exception as e:  # noqa: BLE001 - the evaluation itself is saved already
            print(f"note: could not add the results to Aim run {aim_hash}: {type(e).__name__}: {e}", file=sys.stderr)
    return MultiTracker(trackers)

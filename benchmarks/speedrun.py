"""The CPU speedrun: how much sooner does configs/presets/speedrun_cpu.yaml reach the default recipe's
final val loss? Both run here, one after the other, as `train.py` subprocesses on the same data.

    python benchmarks/speedrun.py [--data shakespeare] [--preset speedrun_cpu] [--runs-dir /tmp/speedrun]

1. The default recipe (configs/*.yaml), to its end; its final val loss becomes the target.
2. The preset with --target-val-loss at that loss: it stops at the first eval that reaches it.
Each is timed from launch to exit (start-up, evals, checkpoints and export included). Samples are off
in both (--sample-length 0): text generation is not training. Evals stay honest: eval_iters batches
of the same val split (the preset keeps val_fraction and eval_iters). Prints both runs and the ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rundir.run_dir import RunDir  # noqa: E402


def train(runs_dir: Path, tag: str, *args: str) -> tuple[float, dict]:
    """Run train.py to its end; (wall seconds, the run's meta/status.json)."""
    cmd = [sys.executable, str(REPO / "train.py"), "--runs-dir", str(runs_dir), "--run-tag", tag,
           "--sample-length", "0", *args]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: train.py exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (run_dir,) = [d for d in runs_dir.iterdir() if d.name.endswith(f"_{tag}")]
    return seconds, RunDir(run_dir).status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shakespeare", help="dataset name or path (default shakespeare)")
    parser.add_argument("--preset", default="speedrun_cpu", help="the recipe to race (default speedrun_cpu)")
    parser.add_argument("--runs-dir", type=Path, help="where both runs go (default: a temporary directory)")
    args = parser.parse_args()
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="speedrun_"))
    runs_dir.mkdir(parents=True, exist_ok=True)

    base_s, base = train(runs_dir, "baseline", "--data", args.data)
    target = base["val_loss"]
    fast_s, fast = train(runs_dir, "speedrun", "--data", args.data, "--config", args.preset,
                         "--target-val-loss", repr(target))
    reached = fast.get("target_reached_at")
    print(f"\ndefault recipe: {base_s:6.1f} s wall, {base['iteration']} steps, final val loss {target:.4f}")
    if not reached:
        print(f"{args.preset}: {fast_s:6.1f} s wall, {fast['iteration']} steps, val loss {fast['val_loss']:.4f}: "
              f"did NOT reach {target:.4f}")
        sys.exit(1)
    print(f"{args.preset}: {fast_s:6.1f} s wall, val loss {reached['val_loss']:.4f} at step {reached['step']} "
          f"({reached['tokens']:,} tokens, {reached['seconds']:.1f} s of training)")
    print(f"ratio: {fast_s / base_s:.3f} of the default recipe's wall time ({base_s / fast_s:.2f}x faster)")


if __name__ == "__main__":
    main()

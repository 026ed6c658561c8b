"""The CPU speedrun: how much sooner does configs/presets/speedrun_cpu.yaml reach the default recipe's
final val loss, or nanoGPT's? Both run here, one after the other, as subprocesses on the same data.

    python benchmarks/speedrun.py [--data shakespeare] [--preset speedrun_cpu] [--runs-dir /tmp/speedrun]
    python benchmarks/speedrun.py --data input.txt --nanogpt ~/nanoGPT     # against nanoGPT's CPU recipe
    python benchmarks/speedrun.py ... --rounds 3                           # alternating rounds, the median ratio

1. The baseline to its end; its final val loss becomes the target. The baseline is the default recipe
   (configs/*.yaml), or with --nanogpt a nanoGPT checkout running the CPU recipe of its README
   (NANOGPT_CPU, in a copy of the checkout, on the same text; its prepare.py runs first, untimed).
2. The preset with --target-val-loss at that loss: it stops at the first eval that reaches it.
Each is timed from launch to exit (start-up, evals, checkpoints and export included). Samples are off
in both (--sample-length 0): text generation is not training. Evals stay honest: eval_iters batches
of the same val split (the preset keeps val_fraction and eval_iters). Against nanoGPT the preset's
eval is at least nanoGPT's (--eval-iters 40: 40 x 24 sequences against 20 x 12 of the same length, on a
val split of the same 10%), and gptlab's token cache is warmed first, as nanoGPT's prepare.py is.
Prints both runs and the ratio. With --rounds N the race is run N times, the order alternating from round
to round (the baseline first in the first, which sets the target for every round), and the median ratio is
the figure: these machines drift by up to 30% between minutes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
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


# nanoGPT's README, "I only have a macbook": its CPU recipe, run as written.
NANOGPT_CPU = ("config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 "
               "--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 "
               "--lr_decay_iters=2000 --dropout=0.0").split()


def nanogpt(checkout: Path, text: Path, work: Path) -> tuple[float, float]:
    """nanoGPT's CPU recipe in a copy of the checkout on `text`: (wall seconds of train.py, its final val loss)."""
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    shutil.copy(text, copy / "data" / "shakespeare_char" / "input.txt")  # prepare.py downloads only when absent
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=copy, check=True, capture_output=True)
    cmd = [sys.executable, "train.py", *NANOGPT_CPU]
    print("$ nanoGPT:", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)
    if proc.returncode != 0 or not evals:
        sys.exit(f"error: nanoGPT's train.py exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds, float(evals[-1][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="shakespeare", help="dataset name or path (default shakespeare)")
    parser.add_argument("--preset", default="speedrun_cpu", help="the recipe to race (default speedrun_cpu)")
    parser.add_argument("--runs-dir", type=Path, help="where both runs go (default: a temporary directory)")
    parser.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout: race its README's CPU recipe instead")
    parser.add_argument("--rounds", type=int, default=1, help="races to run, alternating which goes first (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit(f"error: --rounds must be at least 1, got {args.rounds}")
    if args.nanogpt and (not (args.nanogpt / "train.py").is_file() or not Path(args.data).is_file()):
        sys.exit("error: --nanogpt takes a nanoGPT checkout (with train.py), and --data the text file it trains on")
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="speedrun_"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.nanogpt:  # gptlab's token cache, warmed as nanoGPT's prepare.py warms its own
        train(runs_dir, "cache", "--data", args.data, "--max-iters", "1", "--eval-iters", "1")

    target, ratios = None, []
    for r in range(args.rounds):
        work = runs_dir / f"round{r + 1}" if args.rounds > 1 else runs_dir
        work.mkdir(exist_ok=True)
        if r % 2 == 0:  # the baseline first: the first round's sets the target
            base_s, loss, baseline = run_baseline(args, work)
            target = loss if target is None else target
            fast_s, fast = race(args, work, target)
        else:
            fast_s, fast = race(args, work, target)
            base_s, _, baseline = run_baseline(args, work)
        print(f"\n{baseline}" if args.rounds == 1 else f"\nround {r + 1}: {baseline}")
        reached = fast.get("target_reached_at")
        if not reached:
            print(f"{args.preset}: {fast_s:6.1f} s wall, {fast['iteration']} steps, val loss {fast['val_loss']:.4f}: "
                  f"did NOT reach {target:.4f}")
            sys.exit(1)
        print(f"{args.preset}: {fast_s:6.1f} s wall, val loss {reached['val_loss']:.4f} at step {reached['step']} "
              f"({reached['tokens']:,} tokens, {reached['seconds']:.1f} s of training)")
        ratios.append(fast_s / base_s)
        print(f"ratio: {fast_s / base_s:.3f} of the baseline's wall time ({base_s / fast_s:.2f}x faster)", flush=True)
    if args.rounds > 1:
        median = statistics.median(ratios)
        print(f"\nmedian ratio over {args.rounds} rounds: {median:.3f} ({1 / median:.2f}x faster; rounds "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")


def run_baseline(args: argparse.Namespace, work: Path) -> tuple[float, float, str]:
    """The baseline to its end: (wall seconds, its final val loss, a line saying so)."""
    if args.nanogpt:
        seconds, loss = nanogpt(args.nanogpt, Path(args.data), work)
        return seconds, loss, f"nanoGPT: {seconds:6.1f} s wall, 2000 steps, final val loss {loss:.4f}"
    seconds, status = train(work, "baseline", "--data", args.data)
    return seconds, status["val_loss"], (f"default recipe: {seconds:6.1f} s wall, {status['iteration']} steps, "
                                         f"final val loss {status['val_loss']:.4f}")


def race(args: argparse.Namespace, work: Path, target: float) -> tuple[float, dict]:
    """The preset to the target: (wall seconds, its meta/status.json)."""
    extra = ("--eval-iters", "40") if args.nanogpt else ()
    return train(work, "speedrun", "--data", args.data, "--config", args.preset, "--target-val-loss", repr(target),
                 *extra)


if __name__ == "__main__":
    main()

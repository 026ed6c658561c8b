"""Many runs as one study: an Optuna search over any config keys, each trial an ordinary train.py run.

    python sweep.py sweeps/lr_speedrun_cpu.yaml               # runs/sweeps/<ts>_<name>/, then the table
    python sweep.py sweeps/lr_speedrun_cpu.yaml --jobs 2      # two trials at once, each on half the cores
    python sweep.py --resume runs/sweeps/<id>                 # after Ctrl-C: the study goes on
    python sweep.py --resume runs/sweeps/<id> --worker        # one more worker on the same study (its journal)
    python sweep.py sweeps/X.yaml --storage postgresql://...  # a study workers on several machines share
    python sweep.py --show runs/sweeps/<id>                   # the table, plots, best.yaml again

The sweep file (training/sweeps.py has every key): presets and settings for every trial, a search space,
the objective (val_loss, val_bpb or a benchmark metric of eval_tasks), n_trials, sampler, pruner, seeds.
It is checked whole before anything runs. Trials report each eval to Optuna, which prunes the hopeless
ones (stopped as early stopping stops a run: checkpoint, export). The sweep directory holds sweep.yaml,
the journal (the study), trials/t<N>.yaml (each trial's keys), and at the end plots/, best.yaml (python
train.py --config it) and, for a target_flops series, scaling.json and scaling.png.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from config import Parser, add_fields
from training.study import Sweep, fail_stale, run_worker
from training.sweep_report import report
from training.sweeps import load_sweep
from utils.cli import run_main
from utils.signals import GracefulStop


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?", help="the sweep file, e.g. sweeps/lr_speedrun_cpu.yaml")
    parser.add_argument("--resume", metavar="DIR", help="continue the sweep in runs/sweeps/<id>")
    parser.add_argument("--show", metavar="DIR", help="print the sweep's table and write its plots and best.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once on this machine (default 1); each "
                                                            "gets cores / jobs threads")
    parser.add_argument("--worker", action="store_true", help="with --resume: run trials only (no table at the end)")
    parser.add_argument("--storage", help="an Optuna RDB URL (postgresql://, mysql://, sqlite:///) instead of the "
                                          "journal file in the sweep directory; several machines can share it")
    add_fields(parser, ("runs_dir",))
    args = parser.parse_args(argv)
    if sum(map(bool, (args.file, args.resume, args.show))) != 1:
        raise ValueError("pass a sweep file, or --resume DIR, or --show DIR (one of them)")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.worker and not args.resume:
        raise ValueError("--worker joins a sweep that exists: pass --resume DIR")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.show:
        print(report(Sweep.open(Path(args.show))))
        return 0
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("sweep.py runs its trials itself; start it with python, not torchrun")
    with GracefulStop(immediate=True, during="before the sweep started") as stop:
        if args.resume:
            sweep = Sweep.open(Path(args.resume))
            for note in fail_stale(sweep):
                print(note)
        else:
            sweep = Sweep.create(load_sweep(Path(args.file)), args.storage, args.runs_dir)
            print(f"sweep {sweep.dir}: {sweep.spec.n_trials} trials of {', '.join(sweep.spec.space)}; "
                  f"objective {sweep.spec.objective} ({sweep.spec.direction})")
        stop.immediate = False  # from here a signal reaches the running trials; each stops cleanly
        others = [subprocess.Popen([sys.executable, __file__, "--resume", str(sweep.dir), "--worker"],
                                   env={**os.environ, "GPTLAB_SWEEP_JOBS": str(args.jobs),
                                        "GPTLAB_SWEEP_WORKER": str(k)})
                  for k in range(1, args.jobs)]
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("GPTLAB_SWEEP_JOBS", args.jobs)))
        # a worker started by hand (--worker) takes its pid as its index: its own sampler seeds
        worker = int(os.environ.get("GPTLAB_SWEEP_WORKER", os.getpid() if args.worker else 0))
        reason = run_worker(sweep, stop, threads, worker)
        codes = [p.wait() for p in others]
    if args.worker:
        return stop.exit_code if reason == "interrupted" else int(reason == "failed")
    print(report(sweep))
    if reason == "failed":
        return 1
    if reason == "interrupted" or any(codes):
        print(f"interrupted; continue with: python sweep.py --resume {sweep.dir}")
        return stop.exit_code or 130
    return 0


if __name__ == "__main__":
    run_main(main)

"""Train a GPT-style language model; each run gets its own directory under runs/.

    python train.py --run-tag baseline [--config debug] [--n-layer 6 ...]
    python train.py --resume latest [--max-iters 4000]     # continue a run from its last checkpoint
    python train.py --init-from runs/<id> --data new.txt   # fine-tune a trained model on new text
    python train.py --plan plans/reverse_words.yaml        # several stages, each its own run
    python train.py --help            # every config key, with its default
    python train.py --print-config    # the merged config, then exit

The run directory holds the metadata to reproduce the run (meta/), the console log and TensorBoard
events (logs/), checkpoints and the safetensors export that inference.py loads (artifacts/).
Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and the export, and exits.

The stage reads as its table of contents: parse (config.py) -> start (training/start.py: the config,
the compute, the corpus, every check, before anything is written) -> the run directory (rundir/) ->
build (the model, once, at the corpus' vocabulary) -> the loop (training/trainer.py) -> finish.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

from config import PROJECT_DIR, config_yaml, load_config
from rundir.lock import RunLock
from rundir.meta import write_meta
from rundir.run_dir import RunDir
from rundir.status import RunStatus
from training.plans import open_plan, run_plan
from training.start import resolve_start
from training.build import build_trainer
from training.study import parse_trial, trial_hook
from utils import distributed
from utils.cli import run_main
from utils.console import setup_console_log
from utils.distributed import Dist
from utils.signals import GracefulStop, Interrupted


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = load_config(argv, description=__doc__)
    if parsed.args.print_config:
        print(config_yaml(parsed.config, parsed.files, parsed.notes), end="")
        return 0
    d, device_name = distributed.setup(parsed.config.device)
    try:
        plan = open_plan(parsed, argv, d)  # --plan FILE, or --resume of a plan directory; None for one run
        if plan:
            code = run_plan(plan, lambda argv, **kw: run_once(load_config(argv, description=__doc__), d, device_name,
                                                                **kw))
        else:
            code = run_once(parsed, d, device_name)
        # Tearing the group down is collective: a rank that left while rank 0 still exported aborted
        # in gloo's teardown ("terminate called without an active exception"), failing the launch.
        distributed.barrier(d)
        return code
    finally:
        distributed.teardown(d)


def run_once(parsed, d: Dist, device_name: str, started: Callable[[Path], None] | None = None,
             continue_with: str | None = None) -> int:
    """One run. Until the loop runs, SIGINT/SIGTERM stop the start-up at once (Interrupted); from then
    on they ask the loop to stop after its current step. The ExitStack holds the run directory's lock.
    started hears of the run directory once it exists; continue_with is the command that continues the
    run after an interruption (a plan's own; default: --resume of the run directory)."""
    with GracefulStop(immediate=True, announce=d.is_main) as stop, contextlib.ExitStack() as held:
        notes: list[str] = []
        start = resolve_start(parsed, d, device_name, held, notes)
        if start is None:  # a resumed run with nothing left to train
            print("\n".join(filter(None, notes)))
            return 0
        cfg, resume = start.cfg, start.resume
        status = RunStatus(Path(), enabled=False)
        run = start.run
        if d.is_main:
            with stop.deferred():  # a run directory never exists without its lock and its status
                if not resume:
                    run = RunDir.create(cfg.runs_dir, cfg.run_tag)
                    held.enter_context(RunLock(run.path))
                status = RunStatus(run.path)
                status.start(iteration=resume.iteration if resume else 0, world_size=d.world_size)
        run = RunDir(distributed.broadcast(d, run.path if d.is_main else None))
        if started:
            started(run.path)
        again = continue_with or f"python train.py --resume {run}"
        close_log = setup_console_log(run.log_file(d.rank), console=d.is_main)
        trainer = None
        try:
            if d.is_main and resume:
                run.write_config(cfg.to_dict())  # e.g. a longer max_iters
            elif d.is_main:
                write_meta(run.path, cfg.to_dict(), parsed.files, PROJECT_DIR)
            print(f"run {run}" + (f" | rank {d.rank} of {d.world_size}" if d.enabled else ""))
            for note in [*notes, start.corpus.note, *start.compute.notes]:
                if note:
                    print(note)
            print(start.corpus.summary)
            on_eval = None
            if parsed.args.sweep_trial:  # the run and the sweep's trial point at each other
                on_eval = trial_hook(parsed.args.sweep_trial, run.path, cfg)
                sweep_dir, number = parse_trial(parsed.args.sweep_trial)
                status.update(sweep={"dir": str(sweep_dir), "trial": number})
            trainer = build_trainer(start, run.path, status, d, on_eval)
            # From here a signal only asks to stop: the loop ends after its current step, and one that comes
            # while the export is written lets it finish, so status.json always records how the run ended.
            stop.immediate = False
            return trainer.finish(trainer.run(stop), stop, again)
        except Interrupted as e:
            status.finish("interrupted", stop_reason=str(e))
            then = f"continue with: {again}" if resume or continue_with else "nothing was trained"
            print(f"{e}: stopped before the first step; {then}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            status.finish("interrupted", stop_reason="second interrupt: stopped at once")
            raise
        except BaseException as e:
            status.finish("failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
            raise
        finally:
            if trainer is not None:
                close_quietly(trainer.tracker)
            close_log()


def close_quietly(tracker) -> None:
    """Close the trackers without letting their failure (e.g. a full disk) hide the error that ended the run."""
    try:
        tracker.close()
    except Exception as e:  # noqa: BLE001 - reported, and the run's own outcome stands
        print(f"warning: closing the trackers failed: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)

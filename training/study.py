"""A sweep's study and its workers: the sweep directory, the Optuna storage (a journal file in it, or an
RDB URL), the trials each worker takes and runs as train.py processes, and the hook through which a
trial's Trainer reports its evals (training/sweeps.py has the sweep file and the rules).

    sweep = Sweep.create(spec, storage=None, runs_dir="runs")   # runs/sweeps/<ts>_<name>/
    reason = run_worker(sweep, stop, threads=2)                 # done, or interrupted
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

from config import PROJECT_DIR
from rundir.checkpoint import latest_good
from rundir.run_dir import RunDir, create_dir
from training.sweeps import STEPS, SweepSpec, load_sweep, objective_value, run_objective
from utils.files import atomic_write_json, atomic_write_text, read_json_object

USER_ERROR = 2  # train.py's exit code for a one-line error: the trial failed, and is not tried again



@dataclass
class Sweep:
    dir: Path
    spec: SweepSpec
    storage: str                # an Optuna RDB URL, or "" for the journal file in dir

    @classmethod
    def create(cls, spec: SweepSpec, storage: str | None, runs_dir: str) -> "Sweep":
        root = create_dir(Path(runs_dir) / "sweeps", spec.name)
        shutil.copyfile(spec.source, root / "sweep.yaml")
        atomic_write_json(root / "sweep.json", {"name": spec.name, "storage": storage or "", "runs_dir": runs_dir,
                                                "study": root.name})
        sweep = cls(root, dataclasses.replace(spec, source=root / "sweep.yaml"), storage or "")
        study = sweep.study(create=True)
        for params in spec.enqueue:
            study.enqueue_trial(params)
        return sweep

    @classmethod
    def open(cls, root: Path) -> "Sweep":
        if not (root / "sweep.json").is_file():
            raise FileNotFoundError(f"'{root}' is not a sweep directory (no sweep.json); sweeps live in "
                                    "runs/sweeps/<ts>_<name>/")
        meta = read_json_object(root / "sweep.json")
        return cls(root, load_sweep(root / "sweep.yaml"), meta["storage"])

    @property
    def runs_dir(self) -> str:
        return read_json_object(self.dir / "sweep.json")["runs_dir"]

    def study(self, create: bool = False, seed_offset: int = 0):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        spec = self.spec
        if self.storage:
            storage = self.storage
        else:
            from optuna.storages.journal import JournalFileBackend

            storage = optuna.storages.JournalStorage(JournalFileBackend(str(self.dir / "journal.log")))
        kwargs = {"study_name": self.dir.name, "storage": storage, "pruner": make_pruner(spec),
                  "sampler": make_sampler(spec, spec.sampler_seed + seed_offset)}
        if create:
            return optuna.create_study(direction=spec.direction, load_if_exists=True, **kwargs)
        return optuna.load_study(**kwargs)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The sweep's ask lock: one worker at a time counts the trials and takes a new one."""
        with open(self.dir / "ask.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def make_sampler(spec: SweepSpec, seed: int):
    import optuna

    if spec.sampler == "grid":
        class GridSampler(optuna.samplers.GridSampler):
            """Optuna's, without its study.stop() once the grid is done: that works inside study.optimize
            only; in ask-and-tell it raised before the last trial's state was saved. The workers count."""

            def after_trial(self, study, trial, state, values) -> None:
                pass

        return GridSampler({p.name: p.choices for p in spec.space.values()}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(2, spec.n_trials // 3)))


def make_pruner(spec: SweepSpec):
    import optuna

    warmup = int(spec.prune_after * STEPS)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(warmup, 1), max_resource=STEPS)
    return optuna.pruners.NopPruner()


def parse_trial(target: str) -> tuple[Path, int]:
    """--sweep-trial's "<sweep dir>:<N>" as (the sweep directory, the trial number)."""
    root, _, number = target.rpartition(":")
    if not root or not number.isdigit():
        raise ValueError(f"--sweep-trial {target!r}: expected <sweep dir>:<trial number>, as sweep.py passes it")
    return Path(root), int(number)


def trial_hook(target: str, run: Path, cfg) -> Callable[[int, dict], bool]:
    """train.py --sweep-trial <sweep dir>:<N>: the Trainer's on_eval for trial N; the run is recorded in
    the trial, the trial in the run's status. Reports the objective at the per-mille of the schedule done.
    Prunes (first seed only) from prune_after on and past the warmup, never at the last eval, and for a WSD
    schedule not before its decay: a high learning rate looks worse in the stable phase and then wins in the
    decay, so the loss before the decay does not rank trials the way their end does."""
    root, number = parse_trial(target)
    import optuna

    sweep = Sweep.open(root)
    study = sweep.study()
    frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if frozen is None or frozen.state != optuna.trial.TrialState.RUNNING:
        raise ValueError(f"--sweep-trial {target}: no running trial {number} in that sweep")
    trial = optuna.trial.Trial(study, frozen._trial_id)
    earlier = frozen.user_attrs.get("run_dirs", [])
    trial.set_user_attr("run_dirs", list(dict.fromkeys([*earlier, str(run)])))
    first_seed = not earlier or earlier[0] == str(run)
    decay = 1 - cfg.decay_fraction if cfg.lr_schedule == "wsd" else 0.0
    start = max(sweep.spec.prune_after, cfg.warmup_iters / cfg.max_iters, decay)  # past the warmup, at least

    def on_eval(iteration: int, metrics: dict) -> bool:
        value = objective_value(sweep.spec.objective, metrics)
        if value is None or not first_seed:
            return False
        trial.report(float(value), round(STEPS * iteration / cfg.max_iters))
        return start <= iteration / cfg.max_iters < 1 and trial.should_prune()

    return on_eval


def run_worker(sweep: Sweep, stop, threads: int, worker: int = 0) -> str:
    """Trials, one after another, until n_trials are complete or pruned (counting those other workers
    run); returns why it stopped: done, interrupted, or failed (as many trials failed as were asked for).
    The sampler's seed is sampler_seed, offset by the worker's index and the trials the study holds
    already: a fresh single-worker sweep repeats exactly, while two workers, or a resumed sweep, never
    draw the same sequence."""
    import optuna

    TS = optuna.trial.TrialState
    study = sweep.study(seed_offset=1000 * worker + len(sweep.study().get_trials(deepcopy=False)))
    while not stop.requested:
        with sweep.lock():
            trials = study.get_trials(deepcopy=False)
            taken = sum(t.state in (TS.COMPLETE, TS.PRUNED, TS.RUNNING) for t in trials)
            if taken >= sweep.spec.n_trials:
                return "done"
            failed = sum(t.state == TS.FAIL and not t.user_attrs.get("retry") for t in trials)
            if failed >= sweep.spec.n_trials:  # a space where nothing trains would otherwise loop forever
                print(f"{failed} trials failed (train.py refused their configs, or a retry failed again): stopping; "
                      "the table below says which", flush=True)
                return "failed"
            _enqueue_retries(study, trials)
            trial = study.ask()
            trial.set_user_attr("worker", [socket.gethostname(), os.getpid()])
        params = {name: p.suggest(trial) for name, p in sweep.spec.space.items()}
        state, value, note = run_trial(sweep, study, trial, params, threads)
        print(f"trial {trial.number}: {state}" + (f", {sweep.spec.objective} {value:.4f}" if value is not None else "")
              + (f" ({note})" if note else "") + f" | {_params_text(params)}", flush=True)
        if state == "complete":
            study.tell(trial, value)
        elif state == "pruned":
            study.tell(trial, state=TS.PRUNED)
        else:
            trial.set_user_attr("failure", note)
            trial.set_user_attr("retry", state in ("interrupted", "died"))
            study.tell(trial, state=TS.FAIL)
            if state == "interrupted":
                return "interrupted"
    return "interrupted"


def _enqueue_retries(study, trials) -> None:
    """A failed trial whose process was stopped or died is tried once more, with its parameters (and its
    runs, which the retry resumes from their checkpoints)."""
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.user_attrs.get("retry") and t.number not in retried and "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "resume": t.user_attrs.get("run_dirs", [])})


def _run_dirs(study, number: int) -> list[str]:
    """The trial's runs, read anew from the storage (the train.py process wrote them there; a Trial object
    keeps the attributes it had when it was made)."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number).user_attrs.get("run_dirs", [])


def run_trial(sweep: Sweep, study, trial, params: dict, threads: int) -> tuple[str, float | None, str]:
    """Each seed's run of the trial, in a train.py process; (complete | pruned | failed | interrupted |
    died, the objective (the seeds' mean), a note)."""
    spec = sweep.spec
    trials_dir = sweep.dir / "trials"
    trials_dir.mkdir(exist_ok=True)
    config = trials_dir / f"t{trial.number}.yaml"
    atomic_write_text(config, yaml.safe_dump({**spec.settings, **params}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    resume = trial.user_attrs.get("resume", [])
    values = []
    for k, seed in enumerate(spec.seeds):
        tag = f"{spec.name}-t{trial.number}" + (f"-s{seed}" if len(spec.seeds) > 1 else "")
        earlier = resume[k] if k < len(resume) and latest_good(RunDir(resume[k]).checkpoints) else None
        argv = (["--resume", earlier] if earlier else
                [a for c in spec.config for a in ("--config", c)] + ["--config", str(config), "--seed", str(seed),
                                                                     "--run-tag", tag])
        cmd = [sys.executable, str(PROJECT_DIR / "train.py"), *argv, "--runs-dir", sweep.runs_dir,
               "--sweep-trial", f"{sweep.dir}:{trial.number}"]
        print(f"trial {trial.number}: training{f' (seed {seed})' if len(spec.seeds) > 1 else ''} | "
              f"{_params_text(params)}", flush=True)
        # The run's own logs/train.log keeps its output; the console shows a line per trial (and any error).
        code = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
        runs = _run_dirs(study, trial.number)
        if code in (130, 143):
            return "interrupted", None, f"stopped by a signal; python sweep.py --resume {sweep.dir} tries it again"
        if code == USER_ERROR:
            return "failed", None, "train.py refused the config (its error is above)"
        if code or not runs:
            return "died", None, f"train.py exited with {code}"
        status = RunDir(runs[-1]).status()
        if status.get("stop_reason") == "pruned":
            return "pruned", None, f"at step {status.get('iteration')}"
        value = run_objective(RunDir(runs[-1]), spec.objective)
        if value is None:
            return "failed", None, f"{runs[-1]} has no {spec.objective}"
        values.append(float(value))
    return "complete", sum(values) / len(values), ""


def _params_text(params: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def fail_stale(sweep: Sweep) -> list[str]:
    """Trials left running by a worker of this machine that no longer exists (killed): failed, to be tried
    again. Returns a note per trial."""
    import optuna

    study, notes = sweep.study(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("worker", [None, None])
        if host == socket.gethostname() and not _alive(pid):
            trial = optuna.trial.Trial(study, t._trial_id)
            trial.set_user_attr("retry", True)
            trial.set_user_attr("failure", "its worker process died")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            notes.append(f"trial {t.number} was left running by a worker that died (pid {pid}): failed, tried again")
    return notes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Experiment tracking behind one small interface, so the training loop never asks "is Aim on?".

    tracker = build_tracker(run_dir, config=cfg.to_dict(), extra=extra, aim_logging=cfg.aim_logging,
                            aim_repo=cfg.aim_repo, experiment=cfg.run_tag)
    tracker.log_scalars(step, {"loss": 2.1}, subset="train")     # TB tag "loss/train"
    tracker.close()

`Tracker` itself is the no-op twin; TensorBoardTracker, AimTracker and JsonlTracker (logs/metrics.jsonl,
for notebooks) override what they record; MultiTracker fans out to several. TensorBoard and Aim are imported only when such a tracker is
built: they cost about a second each at start-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from rundir.run_dir import RunDir
from utils.files import atomic_write_text, writable_dir

if TYPE_CHECKING:  # only annotations need torch: a process that just tracks need not import it
    import torch

# Prefixes that wrappers add to parameter names; histograms are named as in the bare model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class Tracker:
    """Records nothing. Subclasses override the calls they support; callers never need to check."""

    run_hash: str | None = None

    def log_config(self, config: dict, extra: dict | None = None) -> None:
        """The run's hyperparameters; `extra` holds facts like git commit/branch and python version."""

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        """Scalars at `step`; `subset` ("train", "val") separates the same metric on different data."""

    def log_histograms(self, step: int, model: torch.nn.Module) -> None:
        """Distribution of every parameter and of every gradient that exists."""

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A piece of text, e.g. a sample generated at an evaluation."""

    def log_eval(self, step: int, name: str, metrics: dict[str, float]) -> None:
        """The metrics of evaluation `name` (evaluate.py's, a plan's) of the model trained to `step`."""

    def close(self) -> None:
        """Flush and release everything; the tracker is not used afterwards."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plain(obj: Any) -> Any:
    """A JSON/YAML-safe copy: Paths, tuples and other objects become strings or lists."""
    return json.loads(json.dumps(obj, default=str))


def _flat_hparams(params: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Flatten nested dicts to "a.b" keys with int/float/str/bool values, as hparams tables need."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, np.ndarray]]:
    """("params"|"grads", parameter name, finite values as float numpy) for every parameter.

    Non-finite values are dropped: a histogram of a diverged model must not crash the run, and
    numpy refuses to bin NaN; the loss curve already shows the divergence.
    """
    for name, param in model.named_parameters():
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        for kind, tensor in (("params", param), ("grads", param.grad)):
            if tensor is None:
                continue
            values = tensor.detach().float().cpu().numpy().ravel()
            values = values[np.isfinite(values)]
            if values.size:
                yield kind, name, values


def _config_markdown(config: dict, extra: dict | None) -> str:
    import yaml

    doc = {"config": _plain(config), **({"extra": _plain(extra)} if extra else {})}
    return "```yaml\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True) + "```"


class TensorBoardTracker(Tracker):
    """Event files in `log_dir` (run_dir/logs/tensorboard); view with `tensorboard --logdir runs`.

    Tags: "<name>/<subset>" for scalars with a subset (loss/train, eval_loss/val), "<name>" without
    (lr); "params/<param>" and "grads/<param>" histograms; text under "<tag>/text_summary" (how
    add_text names it); the config as text under "config/text_summary" plus an hparams session.
    """

    def __init__(self, log_dir: Path, flush_secs: int = 30, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops the earlier events at or after this step, so a
        # curve never shows the steps between the checkpoint and the crash twice.
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=flush_secs, purge_step=purge_step)

    def log_config(self, config: dict, extra: dict | None = None) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", _config_markdown(config, extra), 0)
        # writer.add_hparams would write into a new sub-directory named by the time, splitting the run
        # in two. Writing only the session-start summary here keeps one directory per run; with no
        # experiment summary, TensorBoard's HParams tab builds the table from every run's session info
        # and offers all scalar tags (eval_loss/val, ...) as metric columns.
        _, session_start, _ = hparams(_flat_hparams({**config, **(extra or {})}), {})
        self.writer.file_writer.add_summary(session_start)

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"{name}/{subset}" if subset else name, float(value), step)

    def log_histograms(self, step: int, model: torch.nn.Module) -> None:
        for kind, name, values in _named_tensors(model):
            self.writer.add_histogram(f"{kind}/{name}", values, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        # A fenced block: TensorBoard renders text as markdown, which would eat the newlines.
        self.writer.add_text(tag, f"```\n{text}\n```", step)

    def log_eval(self, step: int, name: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"eval/{name}/{key}", float(value), step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class AimTracker(Tracker):
    """One Aim run in the Aim repo at `repo` (its .aim/ is created if missing); see `aim up` there.

    Scalars: metric `name` with context {"subset": subset} (or {}), so train and val curves of one
    metric share a chart. Histograms: a distribution named after the parameter with context
    {"type": "params"} or {"type": "grads"} (Aim's own PyTorch adapter groups them the same way).
    Text: aim.Text sequences named by tag. Config: run["hparams"]. Pass `run_hash` (kept in the
    run's meta) to continue the same Aim run when training resumes.
    """

    def __init__(self, repo: str | Path, experiment: str | None, run_hash: str | None = None,
                 run_name: str | None = None, start_new: bool = True) -> None:
        import aim
        from aim.sdk.errors import MissingRunError

        self._aim = aim
        # capture_terminal_logs off: logs/train.log already has the console, and Aim's patch of
        # sys.stdout.write would fight the console tee when the two are undone in the other order.
        options = {"repo": str(repo), "capture_terminal_logs": False, **({"experiment": experiment} if experiment else {})}
        # Several runs starting at once in a new repo raced in Aim's set-up of .aim/ (3 of 4 failed):
        # the set-up and the run's creation happen under an exclusive lock on the repo directory.
        with _locked(writable_dir(repo, "--aim-repo")):
            try:
                self.run = aim.Run(run_hash=run_hash, **options)
            except MissingRunError:
                if not start_new:  # adding to a run that must exist (an evaluation's scalars)
                    raise
                print(f"Aim run {run_hash} is not in the Aim repo at {repo}; starting a new Aim run", file=sys.stderr)
                self.run = aim.Run(**options)
        if run_name:
            self.run.name = run_name
        self.run_hash = self.run.hash

    def log_config(self, config: dict, extra: dict | None = None) -> None:
        self.run["hparams"] = _plain({**config, **(extra or {})})

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        context = {"subset": subset} if subset else {}
        for name, value in scalars.items():
            self.run.track(float(value), name=name, step=step, context=context)

    def log_histograms(self, step: int, model: torch.nn.Module) -> None:
        for kind, name, values in _named_tensors(model):
            self.run.track(self._aim.Distribution(values), name=name, step=step, context={"type": kind})

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.run.track(self._aim.Text(text), name=tag, step=step)

    def log_eval(self, step: int, name: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.run.track(float(value), name=key, step=step, context={"eval": name})

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None


class JsonlTracker(Tracker):
    """Scalars as JSON lines in `path` (run_dir/logs/metrics.jsonl), so a notebook needs no TensorBoard:

        {"step": 10, "tokens_seen": 5120, "wall_time": 3.21, "eval_loss/val": 2.95}

    One line per log_scalars call, keyed by the TensorBoard tag ("loss/train", "lr", ...); `tokens_seen`
    is step * tokens_per_step (every rank's tokens) and `wall_time` is what `clock` says (Trainer.elapsed:
    seconds since the run started, earlier sessions included). Each line is flushed, so a killed run keeps
    every line it wrote. On resume (purge_step, as TensorBoard's), the lines of steps >= purge_step, logged
    after the checkpoint the run resumes from, are dropped first (an atomic rewrite), with any torn last line.
    """

    def __init__(self, path: Path, tokens_per_step: int, clock: Callable[[], float],
                 purge_step: int | None = None) -> None:
        self.path, self.tokens_per_step, self.clock = Path(path), tokens_per_step, clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if purge_step is not None and self.path.is_file():
            purge_lines(self.path, purge_step)
        self.file = self.path.open("a", encoding="utf-8")

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        line = {"step": step, "tokens_seen": step * self.tokens_per_step, "wall_time": round(self.clock(), 3)}
        line.update({f"{name}/{subset}" if subset else name: float(value) for name, value in scalars.items()})
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()

    def log_eval(self, step: int, name: str, metrics: dict[str, float]) -> None:
        """A benchmark's metrics (eval_tasks) under TensorBoard's tags: "eval/<name>/acc_norm"."""
        self.log_scalars(step, {f"eval/{name}/{key}": value for key, value in metrics.items()})

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def purge_lines(path: Path, purge_step: int) -> None:
    """Rewrite a metrics.jsonl without its lines at or after purge_step and without lines that do not
    parse (a kill mid-write); untouched when every line stays."""
    text = path.read_text(encoding="utf-8")
    keep = []
    for line in text.splitlines():
        try:
            if json.loads(line)["step"] < purge_step:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    if "".join(keep) != text:
        atomic_write_text(path, "".join(keep))


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on a directory (Linux and macOS lock directories as they lock files)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_aim_run(repo: str | Path, run_hash: str) -> Any:
    """A read-only aim.Run with everything tracked so far, for scripts and tests.

    Aim's SDK reads run metadata through the repo index, which `aim up` keeps current in the
    background; a reader without it must index the run first or sees nothing (aim 3.29).
    """
    import aim
    from aim.sdk.index_manager import RepoIndexManager

    aim_repo = aim.Repo(str(repo))
    try:
        RepoIndexManager(aim_repo).index(run_hash)
    except Exception:  # noqa: BLE001 - index locked by a running `aim up`, which indexes it anyway
        pass
    run = aim_repo.get_run(run_hash)
    if run is None:
        raise FileNotFoundError(f"Aim run {run_hash} not found in the Aim repo at {repo}")
    return run


class MultiTracker(Tracker):
    """Sends every call to each tracker in turn."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)
        self.run_hash = next((t.run_hash for t in self.trackers if t.run_hash), None)

    def log_config(self, config: dict, extra: dict | None = None) -> None:
        for t in self.trackers:
            t.log_config(config, extra)

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        for t in self.trackers:
            t.log_scalars(step, scalars, subset)

    def log_histograms(self, step: int, model: torch.nn.Module) -> None:
        for t in self.trackers:
            t.log_histograms(step, model)

    def log_text(self, step: int, tag: str, text: str) -> None:
        for t in self.trackers:
            t.log_text(step, tag, text)

    def log_eval(self, step: int, name: str, metrics: dict[str, float]) -> None:
        for t in self.trackers:
            t.log_eval(step, name, metrics)

    def close(self) -> None:
        """Close all, even if one fails (its files must still be flushed); re-raise the first error."""
        first_error: BaseException | None = None
        for t in self.trackers:
            try:
                t.close()
            except BaseException as e:  # noqa: BLE001 - re-raised below once the rest are closed
                first_error = first_error or e
        if first_error is not None:
            raise first_error


def build_tracker(run_dir: Path, *, config: dict, extra: dict, aim_logging: bool, aim_repo: str | Path,
                  experiment: str, aim_run_hash: str | None = None, purge_step: int | None = None,
                  tokens_per_step: int = 0, clock: Callable[[], float] | None = None) -> Tracker:
    """TensorBoard and logs/metrics.jsonl always, Aim too when asked; the config is logged to each.
    tokens_per_step (every rank's) and clock (seconds since the run started) give the JSON lines'
    tokens_seen and wall_time.

    The returned tracker's `run_hash` is the Aim run hash (None without Aim): keep it in the run's
    meta and pass it back as `aim_run_hash` on resume.
    """
    run = RunDir(run_dir)
    trackers: list[Tracker] = [TensorBoardTracker(run.tensorboard, purge_step=purge_step),
                               JsonlTracker(run.metrics_file, tokens_per_step, clock or _process_clock(), purge_step)]
    if aim_logging:
        trackers.append(AimTracker(aim_repo, experiment, run_hash=aim_run_hash, run_name=run.name))
    tracker = MultiTracker(trackers)
    tracker.log_config(config, extra)
    return tracker


def _process_clock() -> Callable[[], float]:
    """Seconds since this call: wall_time for a caller that keeps no clock of its own."""
    import time

    start = time.perf_counter()
    return lambda: time.perf_counter() - start

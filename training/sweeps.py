"""Sweeps: many runs as one Optuna study (`python sweep.py sweeps/X.yaml`), each trial an ordinary
train.py run in a process of its own.

    spec = load_sweep(Path("sweeps/lr.yaml"))      # checked whole before anything runs
    sweep = Sweep.create(spec, None, "runs")       # training/study.py: runs/sweeps/<ts>_<name>/, the study
    run_worker(sweep, stop, threads)               # trials until n_trials are complete or pruned
    print(report(sweep))                           # training/sweep_report.py: table, plots/, best.yaml

A sweep file:

    name: lr                                   # optional; default the file's stem
    config: [speedrun_cpu]                     # presets or files for every trial, as --config takes them
    settings: {max_iters: 150}                 # config keys for every trial
    space:                                     # any ModelConfig key
      learning_rate: {type: float, low: 1.0e-3, high: 2.0e-2, log: true}
      n_layer: {type: int, low: 2, high: 6, step: 2}
      arch: {type: categorical, choices: [gpt2, llama]}
      batch_size: {type: grid, values: [12, 24]}
    objective: val_loss                        # val_bpb, or <eval_tasks file stem>:<acc|acc_norm|...>
    direction: minimize                        # default: minimize for losses, maximize for benchmarks
    n_trials: 12                               # complete or pruned trials (grid sampler: the grid's size)
    sampler: tpe                               # tpe, random or grid
    pruner: median                             # median, hyperband or none
    prune_after: 0.3                           # no pruning before this fraction of a trial's schedule
    seeds: [1337]                              # each trial trains once per seed; the objective is the mean
    sampler_seed: 0
    enqueue: [{learning_rate: 6.0e-3}]        # trials to run first: here the preset's own value, to beat

A trial trains `train.py --config <each config> --config <sweep>/trials/t<N>.yaml --seed S --run-tag
<name>-t<N> --sweep-trial <sweep>:<N>`. Its Trainer reports each eval to the trial at the fraction of
its schedule done (per mille), so trials of different lengths are compared at matched fractions; the
pruner waits until prune_after (a WSD trial: until its decay, training/study.py's trial_hook says why)
and never prunes at the last eval. A pruned run stops as early stopping does (checkpoint, export;
stop_reason pruned). Runs and trials point at each other: the run's status.json has sweep {dir, trial},
the trial's user attributes the run directories.

The study lives in an Optuna journal file in the sweep directory (safe for several processes, no server),
or in any Optuna RDB storage (--storage URL) that workers on several machines share. A worker takes a
new trial only while fewer than n_trials are complete, pruned or running, holding a lock file in the
sweep directory: with the journal file the count is exact however many workers run; with RDB storage
on several machines it may overshoot by a trial per extra machine. A trial whose process was stopped
(Ctrl-C) or died is failed, and tried once more (resuming its run from its last checkpoint).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from config import PROJECT_DIR, load_config, read_config_file
from evaluation.likelihood import ACCURACIES
from parameters import ModelConfig, check_values
from rundir.run_dir import RunDir
from utils.files import read_json_object

SWEEP_KEYS = ("name", "config", "settings", "space", "objective", "direction", "n_trials", "sampler", "pruner",
              "prune_after", "seeds", "sampler_seed", "enqueue")
PARAM_KEYS = {"float": ("type", "low", "high", "log"), "int": ("type", "low", "high", "step", "log"),
              "categorical": ("type", "choices"), "grid": ("type", "values")}
SAMPLERS, PRUNERS = ("tpe", "random", "grid"), ("median", "hyperband", "none")
LOSSES = ("val_loss", "val_bpb")
STEPS = 1000  # a trial reports at the per-mille of its schedule done


@dataclass
class Param:
    name: str
    kind: str                        # float, int, categorical, grid
    low: Any = None
    high: Any = None
    log: bool = False
    step: int | None = None
    choices: list = field(default_factory=list)  # categorical choices, or grid values

    def suggest(self, trial) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_categorical(self.name, self.choices)


@dataclass
class SweepSpec:
    name: str
    config: list[str]
    settings: dict[str, Any]
    space: dict[str, Param]
    objective: str
    direction: str
    n_trials: int
    sampler: str
    pruner: str
    prune_after: float
    seeds: list[int]
    sampler_seed: int
    source: Path
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # trials to run first (e.g. the preset's values)


def load_sweep(path: Path) -> SweepSpec:
    """The sweep file, checked whole: keys (with the closest valid one), the space's keys and values against
    ModelConfig, the objective, sampler and pruner; then a trial's config validates as train.py would."""
    if not path.is_file():
        shipped = ", ".join(str(p.relative_to(PROJECT_DIR)) for p in sorted((PROJECT_DIR / "sweeps").glob("*.yaml")))
        raise FileNotFoundError(f"sweep file '{path}' does not exist; the shipped sweeps: {shipped or 'none'}")
    raw, where = read_config_file(path), str(path)
    for key in raw:
        _known(key, SWEEP_KEYS, f"{where}: unknown key", "a sweep has")
    config = [raw["config"]] if isinstance(raw.get("config"), str) else raw.get("config") or []
    if not isinstance(config, list) or not all(isinstance(c, str) for c in config):
        raise ValueError(f"{where}: config must be a preset name or file, or a list of them")
    settings = check_values(ModelConfig, raw.get("settings") or {}, f"{where} settings")
    if not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ValueError(f"{where}: 'space' must map config keys to their ranges, e.g. learning_rate: "
                         "{type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    space = {str(k): _param(str(k), v, where) for k, v in raw["space"].items()}
    both = sorted(set(space) & set(settings))
    if both:
        raise ValueError(f"{where}: {both[0]} is both in settings and in space; keep it in one")
    sampler, pruner = str(raw.get("sampler", "tpe")), str(raw.get("pruner", "median"))
    _known(sampler, SAMPLERS, f"{where}: sampler", "choose one of")
    _known(pruner, PRUNERS, f"{where}: pruner", "choose one of")
    objective = str(raw.get("objective", "val_loss"))
    direction = str(raw.get("direction", "minimize" if objective in LOSSES else "maximize"))
    _known(direction, ("minimize", "maximize"), f"{where}: direction", "choose")
    grid = math.prod(len(p.choices) for p in space.values()) if sampler == "grid" else 0
    if sampler == "grid" and any(p.kind in ("float", "int") for p in space.values()):
        raise ValueError(f"{where}: the grid sampler takes grid or categorical parameters only; "
                         f"{next(p.name for p in space.values() if p.kind in ('float', 'int'))} is a range")
    n_trials = _positive_int(raw.get("n_trials", grid or 10), f"{where}: n_trials")
    if grid and n_trials > grid:
        raise ValueError(f"{where}: n_trials {n_trials} is more than the grid's {grid} points")
    seeds = raw.get("seeds", [ModelConfig.seed])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"{where}: seeds must be a list of integers, e.g. [1337, 1338]")
    prune_after = raw.get("prune_after", 0.3)
    if not isinstance(prune_after, (int, float)) or not 0 <= prune_after < 1:
        raise ValueError(f"{where}: prune_after must be a fraction in [0, 1), got {prune_after!r}")
    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) and set(e) == set(space) for e in enqueue):
        raise ValueError(f"{where}: enqueue must be a list of trials, each giving every space key "
                         f"({', '.join(space)}) a value")
    enqueue = [check_values(ModelConfig, e, f"{where} enqueue") for e in enqueue]
    name = str(raw.get("name") or path.stem)
    spec = SweepSpec(name, config, settings, space, objective, direction, n_trials, sampler, pruner,
                     float(prune_after), seeds, int(raw.get("sampler_seed", 0)), path, enqueue)
    corner = {p.name: _corner(p) for p in space.values()}
    try:
        cfg = trial_config(spec, corner)
    except (ValueError, FileNotFoundError) as e:
        values = ", ".join(f"{k}={v!r}" for k, v in corner.items())
        raise type(e)(f"{where}: a trial at the space's first values ({values}) would not train: {e}") from None
    _check_objective(spec, cfg)
    return spec


def _known(value: str, allowed: tuple[str, ...], what: str, listing: str) -> None:
    if value not in allowed:
        match = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ValueError(f"{what} '{value}'{hint}; {listing} {', '.join(allowed)}")


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def _param(name: str, raw: Any, where: str) -> Param:
    what = f"{where}: space {name}"
    if name not in ModelConfig.__dataclass_fields__:
        _known(name, tuple(ModelConfig.__dataclass_fields__), f"{where}: space: unknown config key", "config keys:")
    if not isinstance(raw, dict) or raw.get("type") not in PARAM_KEYS:
        raise ValueError(f"{what}: expected a mapping with type float, int, categorical or grid")
    kind = raw["type"]
    for key in raw:
        _known(str(key), PARAM_KEYS[kind], f"{what}: unknown key", f"a {kind} parameter has")
    if kind in ("categorical", "grid"):
        values = raw.get("choices" if kind == "categorical" else "values")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{what}: {'choices' if kind == 'categorical' else 'values'} must be a non-empty list")
        for v in values:
            check_values(ModelConfig, {name: v}, what)
        return Param(name, kind, choices=values)
    if "low" not in raw or "high" not in raw:
        raise ValueError(f"{what}: a {kind} range needs low and high")
    low, high = (check_values(ModelConfig, {name: raw[k]}, what)[name] for k in ("low", "high"))
    expected = float if kind == "float" else int
    if not isinstance(low, expected) or not isinstance(high, expected) or isinstance(low, bool):
        raise ValueError(f"{what}: {name} is not a {kind} key (low {low!r}, high {high!r})")
    if not low < high or (raw.get("log") and low <= 0):
        raise ValueError(f"{what}: need low < high{' and low > 0 on a log scale' if raw.get('log') else ''}, got "
                         f"{low!r} and {high!r}")
    return Param(name, kind, low, high, bool(raw.get("log", False)), raw.get("step"))


def _corner(p: Param) -> Any:
    return p.low if p.kind in ("float", "int") else p.choices[0]


def trial_config(spec: SweepSpec, params: dict[str, Any]) -> ModelConfig:
    """The config a trial with these parameters trains with (validated as train.py validates it)."""
    with _temp_yaml({**spec.settings, **params}) as path:
        return load_config([a for c in spec.config for a in ("--config", c)] + ["--config", str(path)]).config


@contextlib.contextmanager
def _temp_yaml(data: dict) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trial.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        yield path


def _check_objective(spec: SweepSpec, cfg: ModelConfig) -> None:
    if spec.objective in LOSSES:
        return
    task, _, metric = spec.objective.partition(":")
    stems = [Path(t.split(":")[-1]).name.split(".")[0] for t in cfg.eval_tasks]
    if task not in stems or metric not in (*ACCURACIES, "acc", "loss", "perplexity"):
        raise ValueError(f"{spec.source}: objective {spec.objective!r}: use val_loss, val_bpb or <eval_tasks file "
                         f"stem>:<metric> (metrics: {', '.join(ACCURACIES)}, loss, perplexity); this sweep's "
                         "eval_tasks "
                         f"give {', '.join(stems) or 'none: add eval_tasks to settings'}")


def objective_value(objective: str, metrics: dict) -> float | None:
    """The objective from an eval's numbers: {"val_loss", "val_bpb", "benchmarks": {name: record}}."""
    if objective in LOSSES:
        return metrics.get(objective)
    task, _, metric = objective.partition(":")
    return metrics.get("benchmarks", {}).get(task, {}).get(metric)


def run_objective(run: RunDir, objective: str) -> float | None:
    """A finished run's objective: its exported weights' val loss / val bpb (status.json), or benchmark
    metric (its newest evals/ record of that name)."""
    status = run.status()
    if objective in LOSSES:
        early = objective == "val_loss" and status.get("stop_reason") == "early_stopping"
        return status.get("best_val_loss" if early else objective)
    task, _, metric = objective.partition(":")
    records = [read_json_object(p) for p in sorted(run.eval_records(), key=lambda p: p.stat().st_mtime_ns)]
    values = [r[metric] for r in records if r.get("name") == task and metric in r]
    return values[-1] if values else None

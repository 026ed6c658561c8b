"""Plans: several stages in one command (`python train.py --plan plans/X.yaml`), their record, and
running them in order.

    plan = open_plan(parsed, argv, d)      # --plan FILE (checked whole, then runs/plans/<ts>_<name>/ made)
                                           # or --resume runs/plans/<id>: continue it; None for one run
    code = run_plan(plan, run_stage)       # run_stage(argv, started=..., continue_with=...): train.py's run

A plan file names its stages in order:

    name: reverse_words            # optional; default the file's stem
    config: [shakespeare_char]     # optional: presets or files for every stage, as --config takes them
    settings: {n_layer: 4}         # optional: config keys for every stage
    stages:
      - name: pretrain             # a training stage: any config keys (data, max_iters, ...)
        data: shakespeare
      - name: finetune             # starts from the previous training stage's export (init_from)
        data: reverse_words
      - name: exact-match          # an evaluation of the last trained stage (evaluate.py's options)
        evaluate: {data: reverse_words, split: val}

Each training stage is its own run (runs/<ts>_<plan>-<stage>/), started as train.py would be with
--config <each plan config> --config <plan dir>/stages/<stage>.yaml plus the flags given with --plan,
which therefore apply to every stage. The plan directory keeps plan.yaml (the file as given) and
state.json: each stage's state (pending, running, completed, interrupted, failed), its run and its
results, written atomically whenever one changes.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from config import PROJECT_DIR, load_config, read_config_file
from data import resolve_data
from evaluation.metrics import report
from evaluation.benchmarks import is_benchmark, read_benchmark
from evaluation.scoring import evaluate_run
from parameters import ModelConfig, check_values
from rundir.checkpoint import latest_good
from rundir.lock import RunLock, run_state
from rundir.run_dir import RunDir, create_dir
from rundir.status import utc_now
from utils.console import format_metrics
from utils.device import resolve_device
from utils.distributed import Dist
from utils.files import atomic_write_json, atomic_write_text, read_json_object, sha256_file
from utils.signals import Interrupted

PLAN_KEYS = ("name", "config", "settings", "stages")
EVALUATE_KEYS = {"data": str, "split": str, "name": str, "max_tokens": int, "max_pairs": int, "batch_size": int}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # config keys (training)
    config: list[str] = field(default_factory=list)         # --config files of this stage
    evaluate: dict[str, Any] | None = None                 # evaluate options (an evaluation stage)


@dataclass
class PlanSpec:
    name: str
    stages: list[Stage]
    source: Path


def load_plan(path: Path) -> PlanSpec:
    """The plan file, checked whole before anything runs: unknown keys, config keys and their types,
    stage names, evaluate options; every problem is a ValueError naming the file and the stage."""
    if not path.is_file():
        shipped = ", ".join(str(p.relative_to(PROJECT_DIR)) for p in sorted((PROJECT_DIR / "plans").glob("*.yaml")))
        raise FileNotFoundError(f"plan file '{path}' does not exist; the shipped plans: {shipped or 'none'}")
    raw = read_config_file(path)
    where = str(path)
    unknown = sorted(set(raw) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key '{unknown[0]}'; a plan has {', '.join(PLAN_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if not NAME.match(name):
        raise ValueError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.'")
    shared_config = _as_list(raw.get("config"), f"{where}: config")
    shared = check_values(ModelConfig, raw.get("settings") or {}, f"{where} settings")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ValueError(f"{where}: 'stages' must be a list of stages, each a mapping with a name")
    stages = [_stage(s, i, where, shared, shared_config) for i, s in enumerate(stages_raw)]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: stage names must differ; {sorted(n for n in names if names.count(n) > 1)[0]!r} "
                         "repeats")
    if stages[0].evaluate is not None:
        raise ValueError(f"{where}: the first stage must train; an evaluate stage scores the run before it")
    return PlanSpec(name, stages, path)


def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: expected a preset name or file, or a list of them")
    return values


def _stage(raw: Any, i: int, where: str, shared: dict, shared_config: list[str]) -> Stage:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not NAME.match(raw["name"]):
        raise ValueError(f"{where}: stage {i + 1} must be a mapping with a name of letters, digits, '_', '-' or '.'")
    where = f"{where} stage '{raw['name']}'"
    if "evaluate" in raw:
        options = raw["evaluate"]
        if set(raw) - {"name", "evaluate"} or not isinstance(options, dict) or "data" not in options:
            raise ValueError(f"{where}: an evaluate stage is `evaluate: {{data: ..., split: val}}` and nothing else")
        for key, value in options.items():
            if key not in EVALUATE_KEYS or not isinstance(value, EVALUATE_KEYS[key]) or isinstance(value, bool):
                raise ValueError(f"{where}: evaluate option {key}: {value!r} is not one of "
                                 f"{', '.join(f'{k} ({t.__name__})' for k, t in EVALUATE_KEYS.items())}")
        if options.get("split", "val") not in ("train", "val", "all"):
            raise ValueError(f"{where}: evaluate split must be train, val or all, not {options['split']!r}")
        return Stage(raw["name"], evaluate=options)
    settings = {k: v for k, v in raw.items() if k not in ("name", "config")}
    settings = {**shared, **check_values(ModelConfig, settings, where)}
    return Stage(raw["name"], settings, shared_config + _as_list(raw.get("config"), f"{where}: config"))


def _kind(stage: Stage) -> str:
    return "evaluate" if stage.evaluate is not None else "train"


def stage_args(stage: Stage, settings_file: Path, flags: list[str]) -> list[str]:
    """train.py's arguments for a training stage whose settings are in settings_file: the plan's and the
    stage's --config files, then that file, then the flags given with --plan."""
    return [*(a for c in stage.config for a in ("--config", c)), "--config", str(settings_file), *flags]


class Plan:
    """A plan directory and its state.json: which stage runs, with which run, and what it reached.
    new_flags: flags given with this --resume, recorded once a stage has started with them."""

    def __init__(self, root: Path, spec: PlanSpec, state: dict, new_flags: list[str] | None = None) -> None:
        self.root, self.spec, self.state, self.new_flags = root, spec, state, list(new_flags or [])

    @classmethod
    def create(cls, spec: PlanSpec, runs_dir: str | Path, flags: list[str]) -> "Plan":
        root = create_dir(Path(runs_dir) / "plans", spec.name)
        (root / "stages").mkdir()
        shutil.copyfile(spec.source, root / "plan.yaml")
        state = {"name": spec.name, "source": str(spec.source), "created": utc_now(),
                 "plan_sha256": sha256_file(root / "plan.yaml"), "flags": flags,
                 "stages": [{"name": s.name, "kind": _kind(s), "state": "pending", "run": None} for s in spec.stages]}
        plan = cls(root, spec, state)
        plan.save()
        return plan

    @classmethod
    def open(cls, root: Path, new_flags: list[str] | None = None) -> "Plan":
        """The plan directory --resume names, refused in one line if its plan.yaml was edited since it started
        (its stages would no longer be the ones state.json records)."""
        state = read_json_object(root / "state.json")
        if not state.get("stages"):
            raise FileNotFoundError(f"'{root}' is not a plan directory (no readable state.json); pass --resume with "
                                    "runs/plans/<id> as `python train.py --plan` printed it")
        spec = load_plan(root / "plan.yaml")
        recorded = [(e["name"], e["kind"]) for e in state["stages"]]
        if state.get("plan_sha256", sha256_file(root / "plan.yaml")) != sha256_file(root / "plan.yaml") \
                or recorded != [(s.name, _kind(s)) for s in spec.stages]:
            raise ValueError(f"{root / 'plan.yaml'} was edited after the plan started, so its stages are no longer "
                             "the ones state.json records; restore it, or start the edited plan anew with "
                             "python train.py --plan FILE")
        spec.source = Path(state.get("source", spec.source))
        return cls(root, spec, state, new_flags)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process runs a plan at a time: a second --resume of it is refused in one line."""
        with RunLock(self.root, what="plan"):
            yield

    def started(self, i: int, run_dir: Path) -> None:
        """Stage i's run has started: its config, these flags included, was accepted."""
        self.state["flags"] = [*self.state.get("flags", []), *self.new_flags]
        self.new_flags = []
        self.record(i, state="running", run=str(run_dir))

    @staticmethod
    def is_plan_dir(path: str | None) -> bool:
        return bool(path) and (Path(path) / "state.json").is_file() and (Path(path) / "plan.yaml").is_file()

    def save(self) -> None:
        atomic_write_json(self.root / "state.json", self.state)

    def record(self, i: int, **changes: Any) -> None:
        self.state["stages"][i].update(changes, updated=utc_now())
        self.save()

    def next_stage(self) -> int | None:
        """The first stage not completed; a stage whose run completed while the plan was not looking
        (killed right after it) counts as completed."""
        for i, entry in enumerate(self.state["stages"]):
            if entry["state"] != "completed" and entry["run"] and run_state(Path(entry["run"])).state == "completed" \
                    and entry["kind"] == "train":
                self.record(i, state="completed")
            if entry["state"] != "completed":
                return i
        return None

    def last_run(self, before: int) -> str | None:
        """The run of the last training stage before stage `before`."""
        runs = [e["run"] for e in self.state["stages"][:before] if e["kind"] == "train" and e["run"]]
        return runs[-1] if runs else None

    def stage_argv(self, i: int) -> list[str]:
        """train.py's arguments for training stage i: resuming its run where it has a checkpoint, else a
        fresh run from its stage file (init_from the previous training stage's run)."""
        entry, stage = self.state["stages"][i], self.spec.stages[i]
        flags = [*self.state.get("flags", []), *self.new_flags]
        if entry["run"] and latest_good(RunDir(entry["run"]).checkpoints):
            return ["--resume", entry["run"], *flags]
        settings = {"run_tag": f"{self.spec.name}-{stage.name}", **stage.settings}
        if i and "init_from" not in stage.settings:
            settings["init_from"] = self.last_run(i)
        path = self.root / "stages" / f"{i + 1}_{stage.name}.yaml"
        atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False, allow_unicode=True))
        return stage_args(stage, path, flags)

    def summary(self) -> str:
        """One line per stage: state, run, and its result."""
        lines = [f"plan {self.root}"]
        for entry in self.state["stages"]:
            shown = format_metrics(entry.get("results") or {})
            lines.append(f"  {entry['name']:<14} {entry['state']:<11} {Path(entry['run']).name if entry['run'] else '-'}"
                         + (f"  {shown}" if shown else ""))
        return "\n".join(lines)


# --- running a plan: train.py hands over the function that runs one training stage ---

def open_plan(parsed, argv: list[str], d: Dist) -> Plan | None:
    """A new plan (--plan FILE: checked whole, then its directory made) or the plan directory --resume
    names; the other flags given apply to every stage."""
    args = parsed.args
    if not args.plan and not Plan.is_plan_dir(args.resume):
        return None
    if d.enabled:
        raise ValueError("a plan runs in one process; under torchrun, launch each stage as its own run "
                         "(python train.py --init-from RUN ...)")
    flags = strip_flag(argv, "--resume" if not args.plan else "--plan")
    if not args.plan:
        # The flags apply from the next stage on; they are recorded once a stage has accepted them
        # (Plan.started), so a flag that is refused never sticks to the plan.
        return Plan.open(Path(args.resume), flags)
    if args.resume or args.config:
        raise ValueError("--plan takes its configs from the plan file (config:, settings:); continue a plan with "
                         "--resume runs/plans/<id> alone")
    spec = load_plan(Path(args.plan))
    return Plan.create(spec, check_plan(spec, flags), flags)


def check_plan(spec: PlanSpec, flags: list[str]) -> str:
    """Every stage's config validates and every stage's data exists, before one trains; returns the
    runs_dir of the first stage, where the plan lives."""
    runs_dir = data_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        for stage in spec.stages:
            if stage.evaluate is not None:  # the first stage trains: data_dir is known by now
                check_data(stage.evaluate["data"], data_dir, f"plan stage '{stage.name}'")
                continue
            stage_file = Path(tmp) / f"{stage.name}.yaml"
            stage_file.write_text(yaml.safe_dump(stage.settings), encoding="utf-8")
            cfg = load_config(stage_args(stage, stage_file, flags)).config
            check_data(cfg.data, cfg.data_dir, f"plan stage '{stage.name}'")
            for spec in cfg.eval_tasks:
                check_benchmark(spec, f"plan stage '{stage.name}': eval_tasks")
            runs_dir, data_dir = runs_dir or cfg.runs_dir, cfg.data_dir
    return runs_dir


def check_benchmark(spec: str, where: str) -> None:
    try:
        read_benchmark(spec)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: {e}") from None


def check_data(spec: str, data_dir: str, where: str) -> None:
    """What --data names must exist (or be a name gptlab knows) before anything trains; a benchmark file
    (an evaluate stage's) must read as one."""
    if is_benchmark(spec):
        return check_benchmark(spec, where)
    try:
        resolve_data(spec, data_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` (or flag=VALUE)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def run_plan(plan: Plan, run_stage: Callable[..., int]) -> int:
    """Each stage not yet completed, in order, holding the plan's lock; a stage that is interrupted stops the
    plan, and --resume on the plan directory continues it there. Whatever stops it says so in one line,
    with the command that continues the plan. run_stage(argv, started=, continue_with=) runs one training
    stage as train.py runs a run, and returns its exit code."""
    n, again = len(plan.spec.stages), f"python train.py --resume {plan.root}"
    with plan.locked():
        while (i := plan.next_stage()) is not None:
            stage = plan.spec.stages[i]
            print(f"== plan {plan.spec.name} ({plan.root}): stage {i + 1}/{n}, {stage.name}", flush=True)
            try:
                if stage.evaluate is not None:
                    code, results = evaluate_stage(plan, i), None
                else:
                    code = run_stage(plan.stage_argv(i), started=lambda run_dir: plan.started(i, run_dir),
                                     continue_with=again)
                    results = run_results(plan.state["stages"][i]["run"])
            except (KeyboardInterrupt, Interrupted):
                plan.record(i, state="interrupted")
                print(f"plan interrupted in stage {stage.name}; continue with: {again}", file=sys.stderr)
                return 130
            except (ValueError, FileNotFoundError) as e:
                plan.record(i, state="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
                raise type(e)(f"{e} (plan stopped in stage {stage.name}; continue with: {again})") from None
            except BaseException as e:
                plan.record(i, state="failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
                print(f"plan stopped in stage {stage.name}; continue with: {again}", file=sys.stderr)
                raise
            if code:  # the run said how it stopped, and that `again` continues it
                plan.record(i, state="interrupted")
                return code
            plan.record(i, state="completed", **({"results": results} if results else {}))
    print(plan.summary())
    return 0


# What an evaluate stage's summary shows: pairs' and text's, then benchmarks' (evaluation/likelihood.py)
PLAN_RESULTS = ("exact_match", "loss", "top1_accuracy", "acc", "acc_norm", "perplexity", "items")


def evaluate_stage(plan: Plan, i: int) -> int:
    """Score the last trained stage's run as evaluate.py would; the results go to that run's evals/ too."""
    options = dict(plan.spec.stages[i].evaluate)
    run = RunDir(plan.last_run(i))
    plan.record(i, state="running", run=str(run))
    config, notes = run.config(), []  # where and on what the run trained
    evaluation = evaluate_run(run, options.pop("data"), data_dir=config.get("data_dir", "data"),
                              device=resolve_device(config.get("device", "cpu")), notes=notes, **options)
    for note in notes:
        print(note)
    print(report(*evaluation))
    plan.record(i, results={k: evaluation.record[k] for k in PLAN_RESULTS if k in evaluation.record})
    return 0


def run_results(run_dir: str | None) -> dict:
    """What a training stage's run reached, for the plan's record."""
    status = RunDir(run_dir).status() if run_dir else {}
    return {k: status[k] for k in ("iteration", "best_val_loss", "val_bpb") if k in status}

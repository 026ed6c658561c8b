"""Train a GPT-style language model; each run gets its own directory under runs/.

    python train.py --run-tag baseline [--config debug] [--n-layer 6 ...]
    python train.py --resume latest [--max-iters 4000]     # continue a run from its last checkpoint
    python train.py --init-from runs/<id> --data new.txt   # fine-tune a trained model on new text
    python train.py --help            # every config key, with its default
    python train.py --print-config    # the merged config, then exit

The run directory holds the metadata to reproduce the run (meta/), the console log and TensorBoard
events (logs/), checkpoints and the safetensors export that inference.py loads (artifacts/).
Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and the export, and exits.
This file is the stage: it resolves the start (fresh, resumed or fine-tuned), builds the parts and
hands them to training.py's Trainer, whose loop profile_model.py times too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from config import PROJECT_DIR, config_yaml, init_config, load_config, rescale_batch, resume_config
from data import Corpus, check_same_corpus, prepare_corpus, resolve_data
from evaluation.scoring import evaluate_run, table
from model import LanguageModel, grow_vocab
from parameters import ModelConfig
from tokenizer import tokenizer_from_dict
from training.trainer import (Trainer, build_optimizer, check_sample_prompt, compile_model, describe_optimizer, restore_best,
                      sample_text, summary)
from rundir.checkpoint import Checkpoint, find_resume
from utils.distributed import Dist
from utils import distributed
from utils.cli import run_main
from utils.console import ProgressLine, format_duration, setup_console_log
from utils.device import Compute, resolve_device, setup_compute
from rundir.export import Export, load_init_source, record_init_source, save_export
from training.estimate import check_fits, check_tokenizing_fits, describe, estimate_run
from utils.files import atomic_write_json, read_json_object, writable_dir
from training.plans import Plan, PlanSpec, load_plan, stage_args
from rundir.lock import RunLock
from rundir.run_dir import RunStatus, create_run_dir, git_summary, write_meta
from utils.signals import GracefulStop, Interrupted
from rundir.tracking import Tracker, build_tracker


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parsed = load_config(argv, description=__doc__)
    if parsed.args.print_config:
        print(config_yaml(parsed.config, parsed.files, parsed.notes), end="")
        return 0
    d, device_name = distributed.setup(parsed.config.device)
    try:
        plan = open_plan(parsed, argv, d)  # --plan FILE, or --resume of a plan directory; None for one run
        code = run_plan(plan, d, device_name) if plan else run_once(parsed, d, device_name)
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
    continue_with: the command that continues it after an interruption (a plan's own; default: --resume
    of the run directory)."""
    with GracefulStop(immediate=True, announce=d.is_main) as stop, contextlib.ExitStack() as held:
        return run(parsed, d, device_name, held, stop, started, continue_with)


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
        # (Plan.accept_flags), so a flag that is refused never sticks to the plan.
        return Plan.open(Path(args.resume), flags)
    if args.resume or args.config:
        raise ValueError("--plan takes its configs from the plan file (config:, settings:); continue a plan with "
                         "--resume runs/plans/<id> alone")
    spec = load_plan(Path(args.plan))
    return Plan.create(spec, check_plan(spec, flags), flags)


def check_plan(spec: PlanSpec, flags: list[str]) -> str:
    """Every stage's config validates and every stage's data exists, before one trains; returns the
    runs_dir of the first stage, where the plan lives."""
    runs_dir = None
    with tempfile.TemporaryDirectory() as tmp:
        for stage in spec.stages:
            if stage.evaluate is not None:
                check_data(stage.evaluate["data"], data_dir, f"plan stage '{stage.name}'")
                continue
            stage_file = Path(tmp) / f"{stage.name}.yaml"
            stage_file.write_text(yaml.safe_dump(stage.settings), encoding="utf-8")
            cfg = load_config(stage_args(stage, stage_file, flags)).config
            check_data(cfg.data, cfg.data_dir, f"plan stage '{stage.name}'")
            runs_dir, data_dir = runs_dir or cfg.runs_dir, cfg.data_dir
    return runs_dir


def check_data(spec: str, data_dir: str, where: str) -> None:
    """What --data names must exist (or be a name gptlab knows) before anything trains."""
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


def run_plan(plan: Plan, d: Dist, device_name: str) -> int:
    """Each stage not yet completed, in order, holding the plan's lock; a stage that is interrupted stops the
    plan, and --resume on the plan directory continues it there. Whatever stops it says so in one line,
    with the command that continues the plan."""
    n, again = len(plan.spec.stages), f"python train.py --resume {plan.root}"
    with plan.locked():
        while (i := plan.next_stage()) is not None:
            stage = plan.spec.stages[i]
            print(f"== plan {plan.spec.name} ({plan.root}): stage {i + 1}/{n}, {stage.name}", flush=True)
            try:
                if stage.evaluate is not None:
                    code, results = evaluate_stage(plan, i), None
                else:
                    code = run_once(load_config(plan.stage_argv(i), description=__doc__), d, device_name,
                                    started=lambda run_dir: plan.started(i, run_dir), continue_with=again)
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


def evaluate_stage(plan: Plan, i: int) -> int:
    """Score the last trained stage's run as evaluate.py would; the results go to that run's evals/ too."""
    options = dict(plan.spec.stages[i].evaluate)
    run_dir = Path(plan.last_run(i))
    plan.record(i, state="running", run=str(run_dir))
    config = read_json_object(run_dir / "meta" / "full_config.json")  # where and on what the run trained
    record, path, note = evaluate_run(run_dir, options.pop("data"), data_dir=config.get("data_dir", "data"),
                                      device=resolve_device(config.get("device", "cpu")), **options)
    if note:
        print(note)
    print(table(record))
    print(f"saved {path}")
    plan.record(i, results={k: record[k] for k in ("exact_match", "loss", "top1_accuracy") if k in record})
    return 0


def run_results(run_dir: str | None) -> dict:
    """What a training stage's run reached, for the plan's record."""
    status = read_json_object(Path(run_dir) / "meta" / "status.json") if run_dir else {}
    return {k: status[k] for k in ("iteration", "best_val_loss", "val_bpb") if k in status}


@dataclass
class Start:
    """What a run starts from, resolved before any run directory exists: a bad flag, corpus or size
    costs nothing. resume and init are the checkpoint (--resume) or export (--init-from), if any."""
    cfg: ModelConfig
    compute: Compute
    corpus: Corpus
    notes: list[str]
    run_dir: Path | None = None          # the run being resumed
    resume: Checkpoint | None = None
    init: Export | None = None           # the model, tokenizer and config --init-from starts from


def resolve_start(parsed, d: Dist, device_name: str, held: contextlib.ExitStack) -> Start | None:
    """Fresh, resumed or fine-tuned: the config, the compute setup, the corpus, and every check that can
    refuse the run; None when a resumed run has nothing left to train. Resuming locks the run (rank 0)."""
    cfg, args, notes, run_dir, resume, init = parsed.config, parsed.args, list(parsed.notes), None, None, None
    if args.resume:
        if args.config:
            raise ValueError("--resume takes the config from the run; pass flags (e.g. --max-iters), not --config")
        run_dir, resume, notes = find_resume(args.resume, cfg.runs_dir)
        if d.is_main:  # before anything is written into it: a second process resuming it is refused here
            held.enter_context(RunLock(run_dir))
        cfg = resume_config(resume.meta["config"], parsed.cli, str(resume.path))
        cfg, note = rescale_batch(cfg, resume.meta.get("world_size", 1), d.world_size)
        notes.append(note)
    elif cfg.init_from:
        init = load_init_source(cfg.init_from, "cpu")
        cfg = init_config(cfg, init.config, parsed.cli)
    compute = setup_compute(device_name if d.enabled else cfg.device, cfg.dtype, cfg.torch_compile)
    given = tokenizer_from_dict(resume.meta["tokenizer"]) if resume else init.tokenizer if init else None
    if not d.is_main:
        distributed.barrier(d)  # rank 0 tokenizes and fills the cache first; the others then hit it
    if cfg.aim_logging and d.is_main:
        writable_dir(cfg.aim_repo, "--aim-repo")  # now, not once the run directory exists
    check_tokenizing_fits(cfg)
    progress = ProgressLine(f"preparing {cfg.data}") if d.is_main else None
    corpus = prepare_corpus(cfg, given, resume.meta.get("data") if resume else None, progress=progress,
                            open_only=not d.is_main)
    if progress:
        progress.close()
    if d.is_main:
        distributed.barrier(d)
    cfg, data_note = adopt_dataset_settings(cfg, corpus)
    notes.append(data_note)
    if resume:
        check_same_corpus(resume.meta.get("data"), corpus)
        if resume.iteration >= cfg.max_iters and (run_dir / "artifacts" / "export" / "export.json").is_file():
            print(f"{run_dir.name} already trained to max_iters={cfg.max_iters} and has its export: nothing left to "
                  f"train; pass --max-iters N (more than {resume.iteration}) to train it further")
            return None
    cfg, prompt_note = check_sample_prompt(cfg, corpus)
    estimate = estimate_run(cfg, corpus.tokenizer.vocab_size, compute.device, compute.dtype, d.world_size,
                            resume.iteration if resume else 0)
    check_fits(estimate, compute.device)  # what cannot fit is refused now, not found out by allocating
    return Start(cfg, compute, corpus, [*notes, prompt_note, *describe(estimate, compute.device)], run_dir, resume,
                 init)


def adopt_dataset_settings(cfg: ModelConfig, corpus: Corpus) -> tuple[ModelConfig, str]:
    """A prepared dataset's tokens were made with its own tokenizer, val_fraction, ...: the run's
    config records those (meta/full_config.json explains the run), with a note where they differ."""
    differ = {k: v for k, v in corpus.settings.items() if k in ModelConfig.__dataclass_fields__ and getattr(cfg, k) != v}
    notes = []
    if "vocab_size" in differ:  # a bpe tokenizer that the corpus left smaller than asked
        notes.append(f"the bpe tokenizer learned {differ['vocab_size']:,} ids, not vocab_size {cfg.vocab_size:,} (a "
                     "corpus this small holds too few distinct merges): the run records the real size")
    said = ", ".join(f"{k} {v!r} (not {getattr(cfg, k)!r})" for k, v in differ.items() if k != "vocab_size")
    if said:
        notes.append(f"the dataset {corpus.name} was prepared with {said}: the run uses those")
    return dataclasses.replace(cfg, **differ), "\n".join(notes)


def run(parsed, d: Dist, device_name: str, held: contextlib.ExitStack, stop: GracefulStop,
        started: Callable[[Path], None] | None = None, continue_with: str | None = None) -> int:
    """Start -> run dir (rank 0: locked, with a status; `started` hears of it) -> model -> loop -> export."""
    start = resolve_start(parsed, d, device_name, held)
    if start is None:
        return 0
    cfg, compute, corpus, resume, run_dir = start.cfg, start.compute, start.corpus, start.resume, start.run_dir
    status = RunStatus(Path(), enabled=False)
    if d.is_main:
        with stop.deferred():  # a run directory never exists without its lock and its status
            if not resume:
                run_dir = create_run_dir(cfg.runs_dir, cfg.run_tag)
                held.enter_context(RunLock(run_dir))
            status = RunStatus(run_dir)
            status.start(iteration=resume.iteration if resume else 0, world_size=d.world_size)
    run_dir = distributed.broadcast(d, run_dir if d.is_main else None)
    if started:
        started(run_dir)
    log_name = "train.log" if d.is_main else f"train.rank{d.rank}.log"
    close_log = setup_console_log(run_dir / "logs" / log_name, console=d.is_main)
    trainer = None
    try:
        if d.is_main and resume:
            atomic_write_json(run_dir / "meta" / "full_config.json", cfg.to_dict())  # e.g. a longer max_iters
        elif d.is_main:
            write_meta(run_dir, cfg.to_dict(), parsed.files, PROJECT_DIR)
        print(f"run {run_dir}" + (f" | rank {d.rank} of {d.world_size}" if d.enabled else ""))
        for note in [*start.notes, corpus.note, *compute.notes]:
            if note:
                print(note)
        print(corpus.summary)
        trainer = build_trainer(cfg, corpus, compute, run_dir, status, d, resume, start.init)
        # From here a signal only asks to stop: the loop ends after its current step, and one that comes
        # while the export is written lets it finish, so status.json always records how the run ended.
        stop.immediate = False
        return finish(trainer, trainer.run(stop), stop, continue_with or f"python train.py --resume {run_dir}")
    except Interrupted as e:
        status.finish("interrupted", stop_reason=str(e))
        then = (f"continue with: {continue_with or f'python train.py --resume {run_dir}'}" if resume or continue_with
                else "nothing was trained")
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


def close_quietly(tracker: Tracker) -> None:
    """Close the trackers without letting their failure (e.g. a full disk) hide the error that ended the run."""
    try:
        tracker.close()
    except Exception as e:  # noqa: BLE001 - reported, and the run's own outcome stands
        print(f"warning: closing the trackers failed: {type(e).__name__}: {e}", file=sys.stderr)


def build_trainer(cfg: ModelConfig, corpus: Corpus, compute: Compute, run_dir: Path, status: RunStatus,
                  d: Dist, resume: Checkpoint | None, init: Export | None) -> Trainer:
    """Model (fresh, fine-tuned or resumed), optimizer, DDP and compile wrappers, and (rank 0) tracking."""
    device, dtype, compiled = compute.device, compute.dtype, compute.compiled
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = LanguageModel(cfg, corpus.tokenizer.vocab_size).to(device)
    if init:
        # Fine-tuning on pairs may add an end-of-text id to a char vocabulary: the model gains its row.
        raw_model.load_state_dict(grow_vocab(init.model.state_dict(), corpus.tokenizer.vocab_size))
        if d.is_main:
            source = record_init_source(run_dir, cfg.init_from)
            status.update(init_from=source)
            print(f"initialized from {source}")
    torch.manual_seed(cfg.seed + d.rank)  # but each rank its own dropout masks
    optimizer = build_optimizer(raw_model, cfg, device)
    trainer = Trainer(cfg, raw_model, raw_model, optimizer, corpus.splits, corpus.tokenizer, device, dtype, run_dir,
                      Tracker(), status, d, data=corpus.identity, bits_per_byte=corpus.bits_per_byte)
    if resume:
        trainer.restore(resume)
        trainer.aim_run_hash = resume.meta.get("aim_run_hash")
        status.update(resumed_from=resume.path.name)
        print(f"resumed from {resume.path.name} at iteration {trainer.iteration}")
    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if d.enabled else raw_model
    # Compile after wrapping: DDPOptimizer then splits the graph at bucket boundaries, so gradient
    # all-reduce overlaps backward (PyTorch's recommended order).
    trainer.model = compile_model(model, device) if compiled else model
    status.update(compiled=compiled, dtype=str(dtype).removeprefix("torch."))  # what auto chose here
    status.update(params=raw_model.num_params())
    print(f"model {raw_model.num_params() / 1e6:.2f}M parameters | device {device} | {str(dtype)[6:]} "
          f"| compile {'on' if compiled else 'off'}{' (auto)' if cfg.torch_compile == 'auto' else ''} "
          f"| {cfg.tokens_per_step * d.world_size:,} tokens/step"
          + (f" ({d.world_size} ranks)" if d.enabled else ""))
    print(describe_optimizer(optimizer, cfg))
    if d.is_main:
        extra = {"git": git_summary(PROJECT_DIR), "python": sys.version.split()[0], "torch": torch.__version__}
        trainer.tracker = build_tracker(run_dir, cfg.to_dict(), extra, cfg.aim_logging, cfg.aim_repo,
                                        cfg.run_tag, trainer.aim_run_hash, trainer.iteration + 1,
                                        cfg.tokens_per_step * d.world_size, trainer.elapsed)
        trainer.aim_run_hash = trainer.tracker.run_hash or trainer.aim_run_hash
    if trainer.aim_run_hash:
        status.update(aim_run_hash=trainer.aim_run_hash)  # a resumed run continues the same Aim run
    return trainer


def finish(trainer: Trainer, reason: str, stop: GracefulStop, continue_with: str) -> int:
    """Export (the best weights if early stopping ended the run), sample, and close the status; a run that
    reached target_val_loss completes there, recording when (target_reached_at)."""
    run_dir, cfg = trainer.run_dir, trainer.cfg
    if not trainer.d.is_main:  # rank 0 writes the export and the status
        return stop.exit_code if reason == "interrupted" else 0
    if reason == "early_stopping":
        print(f"early stopping: val loss has not improved for {cfg.early_stopping_patience} evals; "
              + restore_best(trainer))
    if reason == "target_reached":
        at = trainer.target_reached_at
        print(f"target reached: val loss {at['val_loss']:.4f} <= target_val_loss {cfg.target_val_loss:g} at step "
              f"{at['step']}, after {format_duration(at['seconds'])} and {at['tokens']:,} tokens")
    save_export(run_dir / "artifacts" / "export", trainer.raw_model, cfg.to_dict(), trainer.tokenizer.to_dict())
    print(f"exported to {run_dir / 'artifacts' / 'export'}")
    if cfg.sample_length and reason != "interrupted":
        print("sample:\n" + sample_text(trainer.raw_model, trainer.tokenizer, cfg, trainer.device))
    metrics = {"iteration": trainer.iteration, "best_val_loss": trainer.best_val_loss, "stop_reason": reason,
               "seconds": round(trainer.elapsed(), 1)}
    if reason == "target_reached":
        metrics["target_reached_at"] = trainer.target_reached_at
    if reason == "interrupted":
        trainer.status.finish("interrupted", **metrics)
        print(f"interrupted at iteration {trainer.iteration}; continue with: {continue_with}")
        return stop.exit_code
    trainer.status.finish("completed", **metrics)
    stop.ignore()  # completed and recorded: a Ctrl-C now (while the trackers close) changes nothing
    print(summary(trainer))
    return 0

if __name__ == "__main__":
    run_main(main)

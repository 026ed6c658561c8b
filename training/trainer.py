"""The Trainer: the loop, its evals, checkpoints and tracking, and the end of a run (export, summary).

    trainer = build_trainer(start, run_dir, status, d)     # training/build.py: model, optimizer, wrappers, trackers
    reason = trainer.run(stop)          # "completed", "early_stopping", "target_reached" or "interrupted"
    code = trainer.finish(reason, stop, continue_with)     # export, sample, status, summary

One step and the eval loss are training/step.py's, which profile_model.py times too; optimizers and
schedules are training/optim.py's. Nothing here parses arguments or creates run directories.
"""

from __future__ import annotations

import math
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evaluation.likelihood import EvalTask, headline, score_eval_tasks
from model import LanguageModel
from parameters import ModelConfig
from rundir.checkpoint import (Checkpoint, best_checkpoint, latest_good, load_checkpoint, load_weights, mark_best,
                               rotate, save_checkpoint, verify)
from rundir.run_dir import RunDir
from rundir.sharded import holds_shards
from rundir.evals import METRICS, save_eval
from rundir.export import save_export
from rundir.status import RunStatus
from rundir.tracking import Tracker
from training.optim import get_lr, set_lrs
from training.parallelize import full_copy, gathered, local_bytes
from training.step import NonFiniteStep, estimate_loss, train_step
from utils import distributed
from utils.console import format_duration
from utils.device import autocast
from utils.distributed import Dist
from utils.signals import GracefulStop, Interrupted

# An untrained model predicts nearly uniformly, so its loss is ln(vocab_size): GPT-2 init (std 0.02) gives
# logits of about 0.1, within a few percent of it (tests/test_model.py: 0.2 of ln(30) = 3.4). 25% is far
# outside that, yet a model whose logits are O(1) too large (a missing 1/sqrt(d) scale, a wrong init) or
# data whose targets are not the next tokens lands well beyond it; a NaN is always beyond it.
INITIAL_LOSS_TOLERANCE = 0.25


def sample_text(model: LanguageModel, tokenizer, cfg: ModelConfig) -> str:
    """A short sample from the training prompt, with a fixed seed so samples are comparable across evals;
    on the model's own device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    prompt = torch.tensor([tokenizer.encode(cfg.sample_prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.sample_length, temperature=0.8, top_k=200, generator=gen)
    model.train(was_training)
    ids = out[0, prompt.shape[1]:].tolist()
    if tokenizer.eot_id in ids:  # the model ended the document (or answer) there
        ids = ids[:ids.index(tokenizer.eot_id)]
    return tokenizer.decode(ids)


def eta_pace(pace: float | None, window: float) -> float:
    """Seconds per step for the ETA after a log window that took `window` per step: a moving average, so
    one slow window on a busy machine moves it a third; but a window under half the pace replaces it,
    since the slow part was warming up (CUDA: compilation after the first step made step 10 say 35
    minutes of a run that took 56 seconds)."""
    if pace is None or window < pace / 2:
        return window
    return 0.7 * pace + 0.3 * window


@dataclass(kw_only=True)
class Trainer:
    """The loop and the state it carries between steps; that state is what a checkpoint saves."""
    cfg: ModelConfig
    raw_model: LanguageModel
    model: torch.nn.Module | None = None  # raw_model's DDP or compiled wrapper; None: raw_model itself
    optimizer: torch.optim.Optimizer
    splits: dict
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    tracker: Tracker = field(default_factory=Tracker)
    status: RunStatus = field(default_factory=lambda: RunStatus(Path(), enabled=False))
    d: Dist = field(default_factory=Dist)
    data: dict = field(default_factory=dict)  # the corpus' identity, recorded in every checkpoint
    bits_per_byte: Callable[[str, float], float] | None = None  # Corpus.bits_per_byte: val_bpb at every eval
    iteration: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    aim_run_hash: str | None = None
    window: list = field(default_factory=list)  # per-step losses since the last log line (tensors)
    saved_at: int = -1
    best_step: int = 0
    sec_per_step: float | None = None  # a moving average over log windows: the ETA's pace
    eval_seconds: float = 0.0          # the last eval's duration, for the ETA
    seconds_before: float = 0.0        # wall time of the sessions before a resume, up to their checkpoint
    target_reached_at: dict | None = None  # step, val_loss, seconds, tokens of the eval that reached target_val_loss
    eval_tasks: list[EvalTask] = field(default_factory=list)  # benchmark files scored at every eval (eval_tasks)
    task_scores: dict = field(default_factory=dict)  # iteration -> {task: record}: the last eval's and the best's
    # A sweep's trial (training/sweeps.py): hears each eval's numbers, at the fraction of the schedule done;
    # True stops the run as pruned (checkpoint, export), as early stopping would.
    on_eval: Callable[[int, dict], bool] | None = None
    pruned: bool = False

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.raw_model
        self.stop_requested: Callable[[], bool] = lambda: False  # run() asks its GracefulStop
        self.started = time.perf_counter()
        self.ctx = autocast(self.device, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ckpt_dir = RunDir(self.run_dir).checkpoints

    def run(self, stop: GracefulStop) -> str:
        """Train to max_iters; returns why it stopped: completed, early_stopping, target_reached or
        interrupted."""
        cfg, reason = self.cfg, "completed"
        clock, steps_timed, train_time = time.perf_counter(), 0, 0.0
        self.first_iteration = self.iteration
        self.stop_requested = lambda: distributed.any_rank(self.d, stop.requested)  # every rank agrees
        if self.iteration == 0 and cfg.eval_at_start:
            self.initial_eval()
            if self.stop_requested():  # during the step-0 eval: nothing was trained, nothing to save
                raise Interrupted(stop.signum or signal.SIGINT, "during the step-0 eval")
            clock = time.perf_counter()  # eval time is not training time
        while self.iteration < cfg.max_iters:
            lr = get_lr(self.iteration, cfg)  # learning_rate's groups: what is logged
            set_lrs(self.optimizer, self.iteration, cfg)  # each group scaled to its own peak (Muon's: muon_lr)
            try:
                loss, grad_norm = train_step(self.model, self.optimizer, self.splits["train"], self.iteration, cfg,
                                             scaler=self.scaler, ctx=self.ctx, device=self.device, d=self.d)
            except NonFiniteStep as e:
                what = (f"loss is {e.loss}" if not math.isfinite(e.loss) else
                        f"gradient norm is {e.grad_norm} (loss {e.loss:.4f}), so the step was not applied")
                raise self.diverged(what, self.iteration + 1) from None
            self.iteration += 1
            steps_timed += 1
            it = self.iteration
            self.window.append(loss)
            if cfg.histogram_interval and it % cfg.histogram_interval == 0:
                self.log_histograms()  # before zero_grad, while gradients exist
            if it == self.first_iteration + 1 and self.d.enabled:
                print(self.memory_line(), flush=True)
            self.optimizer.zero_grad(set_to_none=True)
            last = it == cfg.max_iters
            if steps_timed == 1 and it == self.first_iteration + 1 and not (it % cfg.log_interval == 0 or last):
                print(f"step {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {loss.item():.4f} | first step "
                      f"{time.perf_counter() - clock:.2f} s; then a line every {cfg.log_interval} steps", flush=True)
            if it % cfg.log_interval == 0 or last:
                elapsed = time.perf_counter() - clock
                train_time += elapsed
                tokens = steps_timed * cfg.tokens_per_step * self.d.world_size  # every rank's tokens
                self.log(lr, grad_norm, tokens / elapsed, train_time / steps_timed)
                clock, steps_timed, train_time = time.perf_counter(), 0, 0.0
            if it % cfg.eval_interval == 0 or last:
                self.evaluate()
                if self.target_reached_at:  # every rank saw the same val loss (estimate_loss), so all stop here
                    reason = "target_reached"
                elif self.pruned:
                    reason = "pruned"
                elif cfg.early_stopping_patience and self.evals_since_best >= cfg.early_stopping_patience:
                    reason = "early_stopping"
                clock = time.perf_counter()  # eval time is not training time
            if distributed.any_rank(self.d, stop.requested):  # all ranks stop at the same step
                reason = "interrupted"
            if reason != "completed" or last or (cfg.checkpoint_interval and it % cfg.checkpoint_interval == 0):
                self.save()
                clock = time.perf_counter()
            if reason != "completed":
                break
        return reason

    def log_histograms(self) -> None:
        """Every parameter's and gradient's distribution; under fsdp gathered whole first (every rank)."""
        if self.d.is_main or holds_shards(self.raw_model):
            whole = full_copy(self.raw_model, self.cfg, grads=True)
            if whole is not None:
                self.tracker.log_histograms(self.iteration, whole)

    def memory_line(self) -> str:
        """What this rank holds of weights, gradients and optimizer state, measured on the tensors (under
        fsdp its shards): each rank's log says it."""
        params = list(self.raw_model.parameters())
        held = {"weights": local_bytes(params), "gradients": local_bytes(p.grad for p in params if p.grad is not None),
                "optimizer state": local_bytes(t for state in self.optimizer.state.values() for t in state.values()
                                               if isinstance(t, torch.Tensor))}
        layout = f"fsdp, 1/{self.d.world_size} each" if holds_shards(self.raw_model) else "ddp, whole on every rank"
        return (f"rank {self.d.rank} holds " + ", ".join(f"{k} {v / 1e6:,.3f} MB" for k, v in held.items())
                + f" ({layout})")

    def elapsed(self) -> float:
        """Wall time the run has taken: this session's, plus the earlier sessions' up to the checkpoint
        it resumed from."""
        return self.seconds_before + time.perf_counter() - self.started

    def tokens_seen(self) -> int:
        """Tokens trained on so far, every rank's."""
        return self.iteration * self.cfg.tokens_per_step * self.d.world_size

    def window_losses(self) -> list[float]:
        """The losses since the last log line, as floats (one device sync); a NaN or inf stops the run
        here, before any checkpoint could save the damaged weights."""
        window = torch.stack(self.window).float() if self.window else torch.zeros(0, device=self.device)
        values = distributed.mean_across(self.d, window).tolist()  # a NaN on any rank stops every rank
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise self.diverged(f"loss is {v}", self.iteration - len(values) + i + 1)
        return values

    def diverged(self, what: str, at: int) -> ValueError:
        """The one-line error that ends a run whose loss or gradients stopped being finite."""
        good = latest_good(self.ckpt_dir)
        return ValueError(
            f"{what} at iteration {at}: training diverged. Likely causes: learning_rate "
            f"{self.cfg.learning_rate:g} too high (try a third of it, or a longer warmup), or float16 "
            f"overflow (use --dtype bfloat16 or float32). Last good checkpoint: {good.path if good else 'none'}")

    def log(self, lr: float, grad_norm: torch.Tensor, tok_s: float, sec_per_step: float) -> None:
        losses = self.window_losses()
        self.window = []
        train_loss = sum(losses) / len(losses)
        cfg, it = self.cfg, self.iteration
        self.sec_per_step = eta_pace(self.sec_per_step, sec_per_step)
        evals_left = (cfg.max_iters // cfg.eval_interval) - (it // cfg.eval_interval)
        eta = format_duration((cfg.max_iters - it) * self.sec_per_step + evals_left * self.eval_seconds)
        print(f"step {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} "
              f"| {tok_s / 1e3:,.1f}k tok/s | ETA {eta}", flush=True)
        self.tracker.log_scalars(it, {"loss": train_loss}, subset="train")
        self.tracker.log_scalars(it, {"lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tok_s,
                                      "tokens_seen": self.tokens_seen()})
        self.status.heartbeat(iteration=it)  # a live run's status.json stays fresh (rundir/lock.py)

    def measure(self, sample: bool = True) -> tuple[dict[str, float] | None, float | None]:
        """Loss on both splits (and val bits per byte), tracked at this iteration, with a sample; (None,
        None) when a stop was asked for during it."""
        with gathered(self.raw_model):  # fsdp: whole weights for the eval's forwards, gathered once
            return self._measure(sample)

    def _measure(self, sample: bool) -> tuple[dict[str, float] | None, float | None]:
        it, t0 = self.iteration, time.perf_counter()
        losses = estimate_loss(self.model, self.splits, self.cfg, self.device, self.ctx, self.d, self.stop_requested)
        if losses is None:
            return None, None
        bpb = self.bits_per_byte("val", losses["val"]) if self.bits_per_byte else None
        for split, value in losses.items():
            self.tracker.log_scalars(it, {"eval_loss": value}, subset=split)
        if bpb is not None:
            self.tracker.log_scalars(it, {"val_bpb": bpb})
        if self.eval_tasks:
            self.task_scores = {k: v for k, v in self.task_scores.items() if k == self.best_step}
            self.task_scores[it] = self.score_tasks()
            for name, record in self.task_scores[it].items():
                self.tracker.log_eval(it, name, {k: record[k] for k in METRICS if k in record})
        self.eval_seconds = time.perf_counter() - t0  # the ETA's share of each eval, benchmarks included
        if sample and self.cfg.sample_length and self.d.is_main:
            self.tracker.log_text(it, "sample", sample_text(self.raw_model, self.tokenizer, self.cfg))
        return losses, bpb

    def score_tasks(self) -> dict[str, dict]:
        """Every eval_tasks file on the weights as they are (each rank its share, gathered)."""
        training = self.raw_model.training
        scores = score_eval_tasks(self.raw_model, self.eval_tasks, self.device, lambda x: distributed.gather(self.d, x))
        self.raw_model.train(training)
        return scores

    def task_line(self) -> str:
        """" | hellaswag_val acc_norm 31.20% | ..." for the eval line: each task's headline metric."""
        scores = self.task_scores.get(self.iteration, {})
        return "".join(f" | {name} {' '.join(headline(r))}" for name, r in scores.items())

    def initial_eval(self) -> None:
        """Step 0 of a fresh run: the loss before any training beside ln(vocab_size), the loss of uniform
        predictions, with a warning when they are far apart: a broken initialization or data is caught
        before any training time is spent. Tracked only (no checkpoint, best, early stopping or target),
        except when fine-tuning (init_from): the starting weights are then the first best, checkpointed.
        It draws no random numbers (eval mode, fixed eval batches), so training goes on bit-identically."""
        losses, bpb = self.measure(sample=False)
        if losses is None:
            return
        line = eval_line(0, losses, bpb) + self.task_line()
        if self.cfg.init_from:  # a trained model's loss is meant to be below ln(vocab)
            print(line, flush=True)
            # Fine-tuning starts from weights worth keeping: they are the first best, so a run that only makes
            # them worse says so, and early stopping exports them.
            self.new_best(losses["val"])
            self.status.update(best_val_loss=self.best_val_loss)
            return
        uniform = math.log(self.raw_model.vocab_size)
        print(f"{line} (ln(vocab {self.raw_model.vocab_size}) = {uniform:.4f})", flush=True)
        far = [f"{split} {v:.4f}" for split, v in losses.items()
               if not abs(v - uniform) <= INITIAL_LOSS_TOLERANCE * uniform]
        if far:
            print(f"warning: initial loss ({', '.join(far)}) is more than {INITIAL_LOSS_TOLERANCE:.0%} from "
                  f"ln(vocab) = {uniform:.4f}, the loss of uniform predictions: check the initialization and the "
                  "data before training", flush=True)

    def evaluate(self) -> None:
        """Loss on both splits, tracked, with a sample; a new best val loss is checkpointed as best,
        any other result counts towards early stopping."""
        it = self.iteration
        losses, bpb = self.measure()
        if losses is None:  # stopped during the eval: the loop saves a checkpoint and ends
            return
        print(eval_line(it, losses, bpb) + self.task_line(), flush=True)
        if self.cfg.target_val_loss and losses["val"] <= self.cfg.target_val_loss:
            self.target_reached_at = {"step": it, "val_loss": losses["val"], "seconds": round(self.elapsed(), 3),
                                      "tokens": self.tokens_seen()}
        if losses["val"] < self.best_val_loss:
            self.new_best(losses["val"])
        else:
            self.evals_since_best += 1
        if self.on_eval and it > 0:
            self.pruned = self.on_eval(it, {"val_loss": losses["val"], "val_bpb": bpb,
                                            "benchmarks": self.task_scores.get(it, {})})
        self.status.update(iteration=it, train_loss=losses["train"], val_loss=losses["val"],
                           best_val_loss=self.best_val_loss, **({"val_bpb": bpb} if bpb is not None else {}),
                           **({"benchmarks": {name: dict(zip(("metric", "value"), headline(r, raw=True)))
                                             for name, r in self.task_scores[it].items()}} if self.eval_tasks else {}))

    def new_best(self, val_loss: float) -> None:
        """This iteration's weights are the best so far: checkpointed, and named in best.json."""
        self.best_val_loss, self.evals_since_best, self.best_step = val_loss, 0, self.iteration
        path = self.save()
        if self.d.is_main:
            mark_best(self.ckpt_dir, path, val_loss)

    def save(self) -> Path:
        """Checkpoint this iteration (once; rank 0 writes, every rank contributes its RNG state; under
        fsdp every rank writes its shards), then rotate the old ones."""
        path = self.ckpt_dir / f"step_{self.iteration:06d}"
        if self.saved_at != self.iteration:
            window = self.window_losses()
            rank_rng = distributed.gather(self.d, torch.get_rng_state())  # dropout masks differ per rank
            self.saved_at = self.iteration
            if not (self.d.is_main or holds_shards(self.raw_model)):
                return path
            meta = {"iteration": self.iteration, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                    "evals_since_best": self.evals_since_best, "loss_window": window,
                    "aim_run_hash": self.aim_run_hash, "world_size": self.d.world_size, "seconds": self.elapsed(),
                    "config": self.cfg.to_dict(), "tokenizer": self.tokenizer.to_dict(), "data": self.data}
            t0 = time.perf_counter()
            path = save_checkpoint(self.ckpt_dir, self.raw_model, self.optimizer, self.scaler, meta,
                                   {"rank_torch_rng": rank_rng}, self.d)
            if not self.d.is_main:
                return path
            rotate(self.ckpt_dir, self.cfg.keep_checkpoints)
            self.status.update(iteration=self.iteration, checkpoint=path.name)  # a kill now loses nothing recorded
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            print(f"saved checkpoint {path.name} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s)", flush=True)
        return path

    def finish(self, reason: str, stop: GracefulStop, continue_with: str) -> int:
        """Export (the best weights if early stopping ended the run), sample, and close the status; a run
        that reached target_val_loss completes there, recording when (target_reached_at). Rank 0 writes;
        the exit code is the signal's for an interrupted run, else 0."""
        cfg, run = self.cfg, RunDir(self.run_dir)
        code = stop.exit_code if reason == "interrupted" else 0
        if not (self.d.is_main or holds_shards(self.raw_model)):
            return code
        exported = restore_best(self) if reason == "early_stopping" else ""  # under fsdp: every rank, together
        model = full_copy(self.raw_model, cfg)  # fsdp: gathered whole on rank 0 (a plain CPU copy)
        if not self.d.is_main:
            return code
        if reason == "early_stopping":
            print(f"early stopping: val loss has not improved for {cfg.early_stopping_patience} evals; " + exported)
        if reason == "pruned":
            print(f"pruned at step {self.iteration}: the sweep's pruner judged this trial behind the others at the "
                  "same fraction of their schedules")
        if reason == "target_reached":
            at = self.target_reached_at
            print(f"target reached: val loss {at['val_loss']:.4f} <= target_val_loss {cfg.target_val_loss:g} at step "
                  f"{at['step']}, after {format_duration(at['seconds'])} and {at['tokens']:,} tokens")
        save_export(run.export, model, cfg.to_dict(), self.tokenizer.to_dict())
        print(f"exported to {run.export}")
        self.save_task_scores(run, self.best_step if reason == "early_stopping" else self.iteration)
        if cfg.sample_length and reason != "interrupted":
            print("sample:\n" + sample_text(model, self.tokenizer, cfg))
        metrics = {"iteration": self.iteration, "best_val_loss": self.best_val_loss, "stop_reason": reason,
                   "seconds": round(self.elapsed(), 1)}
        if reason == "target_reached":
            metrics["target_reached_at"] = self.target_reached_at
        if reason == "interrupted":
            self.status.finish("interrupted", **metrics)
            print(f"interrupted at iteration {self.iteration}; continue with: {continue_with}")
            return code
        self.status.finish("completed", **metrics)
        stop.ignore()  # completed and recorded: a Ctrl-C now (while the trackers close) changes nothing
        print(summary(self))
        return 0

    def save_task_scores(self, run: RunDir, exported: int) -> None:
        """The eval_tasks scores of the exported weights (step `exported`) as evals/ records, as evaluate.py
        would save them: what runs.py leaderboard reads. Weights no eval scored (an interrupted run) get a
        note with the command that scores them."""
        if not self.eval_tasks:
            return
        scores = self.task_scores.get(exported)
        if scores is None:
            files = " ".join(str(t.bench.path) for t in self.eval_tasks)
            print(f"note: no eval scored the exported weights (step {exported}) on eval_tasks; score them with "
                  f"python evaluate.py --run {run.path} --data FILE, for each of {files}")
            return
        for record in scores.values():
            save_eval(run, {"run": run.name, **record, "iteration": exported}, track=False)

    def restore(self, ckpt: Checkpoint) -> None:
        trainer = load_checkpoint(ckpt, self.raw_model, self.optimizer, self.scaler, self.device)
        rank_rng = trainer.get("rank_torch_rng", [])
        if len(rank_rng) == self.d.world_size:
            torch.set_rng_state(rank_rng[self.d.rank].cpu())
        else:  # another world size: fresh per-rank streams; resumes, but not bit-identically
            torch.manual_seed(self.cfg.seed + self.d.rank + ckpt.iteration)
            if self.cfg.dropout > 0:  # without dropout nothing draws from these streams
                print(f"resuming on {self.d.world_size} rank(s) a run saved on {len(rank_rng)}: "
                      "dropout streams restart from the seed")
        meta = ckpt.meta
        self.iteration, self.best_val_loss = meta["iteration"], meta["best_val_loss"]
        self.evals_since_best, self.saved_at = meta["evals_since_best"], meta["iteration"]
        self.best_step, self.seconds_before = meta.get("best_step", 0), meta.get("seconds", 0.0)
        self.window = [torch.tensor(v, device=self.device) for v in meta["loss_window"]]


def eval_line(step: int, losses: dict[str, float], bpb: float | None) -> str:
    """The console line of an eval."""
    return (f"eval step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            + (f", val bpb {bpb:.4f}" if bpb is not None else ""))


def restore_best(trainer: Trainer) -> str:
    """Load the best checkpoint's weights, verified as resume verifies them; if it is missing or
    damaged, keep the final weights. Returns what will be exported."""
    best = best_checkpoint(trainer.ckpt_dir)
    try:
        if best is None:
            raise ValueError("best.json names no checkpoint on disk")
        verify(best)
    except ValueError as e:
        trainer.status.update(export_note=f"final weights: the best checkpoint failed its check ({e})")
        return f"exporting the final weights, because the best checkpoint failed its check: {e}"
    load_weights(best, trainer.raw_model, trainer.device)
    return f"exporting the best weights ({best.name}, val loss {trainer.best_val_loss:.4f})"


def summary(trainer: Trainer) -> str:
    """The end of a completed run: what it took, what it reached, where it went, what to type next."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    tokens = trainer.iteration * cfg.tokens_per_step * trainer.d.world_size
    best = (f"best val loss {trainer.best_val_loss:.4f} at step {trainer.best_step}"
            if math.isfinite(trainer.best_val_loss) else "no eval")
    # A model fine-tuned on pairs answers a prompt laid out as in training, best read greedily.
    prompt = (f"--prompt {shell_quote(cfg.sample_prompt)} --temperature 0" if trainer.data.get("kind") == "pairs"
              else '--prompt "..."')
    return (f"done in {format_duration(time.perf_counter() - trainer.started)}: {trainer.iteration:,} steps, "
            f"{tokens:,} tokens; {best}; export {RunDir(run_dir).export}\n"
            f"next: python inference.py --run {run_dir} {prompt}   |   tensorboard --logdir {run_dir.parent}")


def shell_quote(text: str) -> str:
    """text as one shell word to paste: shlex's quoting, or bash's $'...' where it holds a newline or tab."""
    if not any(c in text for c in "\n\t"):
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{escaped}'"



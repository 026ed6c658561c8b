"""Train a GPT-style language model; each run gets its own directory under runs/.

    python train.py --run-tag baseline [--config debug] [--n-layer 6 ...]
    python train.py --resume latest [--max-iters 4000]     # continue a run from its last checkpoint
    python train.py --init-from runs/<id> --data new.txt   # fine-tune a trained model on new text
    python train.py --help            # every config key, with its default
    python train.py --print-config    # the merged config, then exit

The run directory holds the metadata to reproduce the run (meta/), the console log and TensorBoard
events (logs/), checkpoints and the safetensors export that inference.py loads (artifacts/).
Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and the export, and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from config import PROJECT_DIR, config_yaml, init_config, load_config, rescale_batch, resume_config
from data import Corpus, check_same_corpus, get_batch, prepare_corpus
from model import LanguageModel
from parameters import ModelConfig
from tokenizer import tokenizer_from_dict
from utils.checkpoint import (Checkpoint, best_checkpoint, find_resume, latest_good, load_checkpoint, load_weights,
                              mark_best, rotate, save_checkpoint, verify)
from utils.distributed import Dist
from utils import distributed
from utils.cli import run_main
from utils.console import format_duration, setup_console_log
from utils.device import Compute, autocast, setup_compute
from utils.export import load_export, record_init_source, save_export
from utils.estimate import check_fits, describe, estimate_run
from utils.files import atomic_write_json, writable_dir
from utils.run_state import RunLock
from utils.runs import RunStatus, create_run_dir, git_summary, write_meta
from utils.signals import GracefulStop, Interrupted
from utils.tracking import Tracker, build_tracker

EVAL_SEED_OFFSET = 1  # eval batches: a fixed set drawn with seed + 1, so every eval scores the same text


def get_lr(step: int, cfg: ModelConfig) -> float:
    """Linear warmup to learning_rate, cosine decay to min_lr over decay_iters, then min_lr."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def build_optimizer(model: torch.nn.Module, cfg: ModelConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (Linear, Embedding) only, never on biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type == "cuda"  # one kernel for the whole update instead of one per tensor
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile; inductor has no MPS backend, so MPS gets aot_eager. Exports use the raw model."""
    return torch.compile(model, backend="aot_eager" if device.type == "mps" else "inductor")


def train_step(model, optimizer, scaler, tokens, cfg: ModelConfig, step: int, device, ctx, d: Dist = Dist()):
    """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) as
    tensors, unsynchronized. The caller zeroes the gradients (after any histogram logging).
    Under DDP each rank takes its slice of the step's global batch, and gradients are all-reduced
    only on the last micro-step (no_sync before it)."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum_steps):
        with torch.profiler.record_function("data"):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed, step=step, micro=micro,
                             n_micro=cfg.grad_accum_steps, rank=d.rank, world_size=d.world_size, device=device)
        last = micro == cfg.grad_accum_steps - 1
        with ddp.no_sync() if isinstance(ddp, DDP) and not last else contextlib.nullcontext():
            with torch.profiler.record_function("forward"), ctx:
                _, loss = model(x, y)
            with torch.profiler.record_function("backward"):
                scaler.scale(loss / cfg.grad_accum_steps).backward()
        loss_sum += loss.detach()
    with torch.profiler.record_function("optimizer"):
        scaler.unscale_(optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")  # inf: measure the norm, clip nothing
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
    return loss_sum / cfg.grad_accum_steps, grad_norm


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict, cfg: ModelConfig, device: torch.device, ctx,
                  d: Dist = Dist()) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches per split, in eval mode (no dropout); under DDP each
    rank scores its slice and the means are averaged, so every rank gets the same numbers."""
    model.eval()
    losses = torch.zeros(2, cfg.eval_iters, device=device)
    for i, split in enumerate(("train", "val")):
        for k in range(cfg.eval_iters):
            x, y = get_batch(splits[split], cfg.batch_size, cfg.block_size, seed=cfg.seed + EVAL_SEED_OFFSET,
                             step=k, split=split, rank=d.rank, world_size=d.world_size, device=device)
            with ctx:
                _, loss = model(x, y)
            losses[i, k] = loss.float()
    model.train()
    train, val = distributed.mean_across(d, losses.mean(dim=1)).tolist()
    return {"train": train, "val": val}


def check_sample_prompt(cfg: ModelConfig, corpus: Corpus) -> tuple[ModelConfig, str]:
    """The sample prompt, checked against the vocabulary before step 0: a first eval that cannot encode
    it would end the run with nothing saved. The default prompt adapts to the corpus (returning a
    note); one the user chose must encode, or it is a one-line error."""
    if not cfg.sample_length:
        return cfg, ""
    try:
        if corpus.tokenizer.encode(cfg.sample_prompt):
            return cfg, ""
        problem = "it encodes to no tokens"
    except ValueError as e:
        problem = str(e).split(";")[0]
    default = ModelConfig.__dataclass_fields__["sample_prompt"].default
    if cfg.sample_prompt != default:
        raise ValueError(f"sample_prompt {cfg.sample_prompt[:40]!r} cannot start a sample: {problem}; choose one "
                         "from the corpus' characters, or pass --sample-length 0")
    prompt = corpus.source.text[0]
    return (dataclasses.replace(cfg, sample_prompt=prompt),
            f"the default sample prompt {default!r} is not in this corpus' vocabulary; samples start from {prompt!r}")


def sample_text(model: LanguageModel, tokenizer, cfg: ModelConfig, device: torch.device) -> str:
    """A short sample from the training prompt, with a fixed seed so samples are comparable across evals."""
    was_training = model.training
    model.eval()
    prompt = torch.tensor([tokenizer.encode(cfg.sample_prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.sample_length, temperature=0.8, top_k=200, generator=gen)
    model.train(was_training)
    return tokenizer.decode(out[0, prompt.shape[1]:].tolist())


@dataclass
class Trainer:
    """The loop and the state it carries between steps; that state is what a checkpoint saves."""
    cfg: ModelConfig
    raw_model: LanguageModel
    model: torch.nn.Module          # raw_model, or its compiled wrapper
    optimizer: torch.optim.AdamW
    splits: dict
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    tracker: Tracker
    status: RunStatus
    d: Dist = field(default_factory=Dist)
    data: dict = field(default_factory=dict)  # the corpus' identity, recorded in every checkpoint
    iteration: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    aim_run_hash: str | None = None
    window: list = field(default_factory=list)  # per-step losses since the last log line (tensors)
    saved_at: int = -1
    best_step: int = 0
    sec_per_step: float | None = None  # a moving average over log windows: the ETA's pace
    eval_seconds: float = 0.0          # the last eval's duration, for the ETA

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.ctx = autocast(self.device, self.dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.ckpt_dir = self.run_dir / "artifacts" / "checkpoints"

    def run(self, stop: GracefulStop) -> str:
        """Train to max_iters; returns why it stopped: completed, early_stopping or interrupted."""
        cfg, reason = self.cfg, "completed"
        clock, steps_timed, train_time = time.perf_counter(), 0, 0.0
        self.first_iteration = self.iteration
        while self.iteration < cfg.max_iters:
            lr = get_lr(self.iteration, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(self.model, self.optimizer, self.scaler, self.splits["train"], cfg,
                                         self.iteration, self.device, self.ctx, self.d)
            self.iteration += 1
            steps_timed += 1
            it = self.iteration
            self.window.append(loss)
            if cfg.histogram_interval and it % cfg.histogram_interval == 0:
                self.tracker.log_histograms(it, self.raw_model)  # before zero_grad, while gradients exist
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
                if cfg.early_stopping_patience and self.evals_since_best >= cfg.early_stopping_patience:
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

    def window_losses(self) -> list[float]:
        """The losses since the last log line, as floats (one device sync); a NaN or inf stops the run
        here, before any checkpoint could save the damaged weights."""
        window = torch.stack(self.window).float() if self.window else torch.zeros(0, device=self.device)
        values = distributed.mean_across(self.d, window).tolist()  # a NaN on any rank stops every rank
        for i, v in enumerate(values):
            if not math.isfinite(v):
                at = self.iteration - len(values) + i + 1
                good = latest_good(self.ckpt_dir)[0]
                raise ValueError(
                    f"loss is {v} at iteration {at}: training diverged. Likely causes: learning_rate "
                    f"{self.cfg.learning_rate:g} too high (try a third of it, or a longer warmup), or float16 "
                    f"overflow (use --dtype bfloat16 or float32). Last good checkpoint: "
                    f"{good.path if good else 'none'}")
        return values

    def log(self, lr: float, grad_norm: torch.Tensor, tok_s: float, sec_per_step: float) -> None:
        losses = self.window_losses()
        self.window = []
        train_loss = sum(losses) / len(losses)
        cfg, it = self.cfg, self.iteration
        # The ETA's pace is a moving average over windows: one slow window on a busy machine moves it a third.
        self.sec_per_step = sec_per_step if self.sec_per_step is None else 0.7 * self.sec_per_step + 0.3 * sec_per_step
        evals_left = (cfg.max_iters // cfg.eval_interval) - (it // cfg.eval_interval)
        eta = format_duration((cfg.max_iters - it) * self.sec_per_step + evals_left * self.eval_seconds)
        print(f"step {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} "
              f"| {tok_s / 1e3:,.1f}k tok/s | ETA {eta}", flush=True)
        self.tracker.log_scalars(it, {"loss": train_loss}, subset="train")
        self.tracker.log_scalars(it, {"lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tok_s})
        self.status.heartbeat(iteration=it)  # a live run's status.json stays fresh (utils/run_state.py)

    def evaluate(self) -> None:
        """Loss on both splits, tracked, with a sample; a new best val loss is checkpointed as best,
        any other result counts towards early stopping."""
        it, t0 = self.iteration, time.perf_counter()
        losses = estimate_loss(self.model, self.splits, self.cfg, self.device, self.ctx, self.d)
        self.eval_seconds = time.perf_counter() - t0
        print(f"eval step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
        for split, value in losses.items():
            self.tracker.log_scalars(it, {"eval_loss": value}, subset=split)
        if self.cfg.sample_length and self.d.is_main:
            self.tracker.log_text(it, "sample", sample_text(self.raw_model, self.tokenizer, self.cfg, self.device))
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss, self.evals_since_best, self.best_step = losses["val"], 0, it
            path = self.save()
            if self.d.is_main:
                mark_best(self.ckpt_dir, path, losses["val"])
        else:
            self.evals_since_best += 1
        self.status.update(iteration=it, train_loss=losses["train"], val_loss=losses["val"],
                           best_val_loss=self.best_val_loss)

    def save(self) -> Path:
        """Checkpoint this iteration (once; rank 0 writes, every rank contributes its RNG state),
        then rotate the old ones."""
        path = self.ckpt_dir / f"step_{self.iteration:06d}"
        if self.saved_at != self.iteration:
            window = self.window_losses()
            rank_rng = distributed.gather(self.d, torch.get_rng_state())  # dropout masks differ per rank
            self.saved_at = self.iteration
            if not self.d.is_main:
                return path
            meta = {"iteration": self.iteration, "best_val_loss": self.best_val_loss, "best_step": self.best_step,
                    "evals_since_best": self.evals_since_best, "loss_window": window,
                    "aim_run_hash": self.aim_run_hash, "world_size": self.d.world_size,
                    "config": self.cfg.to_dict(), "tokenizer": self.tokenizer.to_dict(), "data": self.data}
            t0 = time.perf_counter()
            path = save_checkpoint(self.ckpt_dir, self.raw_model, self.optimizer, self.scaler, meta,
                                   {"rank_torch_rng": rank_rng})
            rotate(self.ckpt_dir, self.cfg.keep_checkpoints)
            self.status.update(iteration=self.iteration, checkpoint=path.name)  # a kill now loses nothing recorded
            size = sum(f.stat().st_size for f in path.iterdir())
            print(f"saved checkpoint {path.name} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s)", flush=True)
        return path

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
        self.best_step = meta.get("best_step", 0)
        self.window = [torch.tensor(v, device=self.device) for v in meta["loss_window"]]


def main(argv: list[str] | None = None) -> int:
    parsed = load_config(argv, description=__doc__)
    if parsed.args.print_config:
        print(config_yaml(parsed.config, parsed.files), end="")
        return 0
    d, device_name = distributed.setup(parsed.config.device)
    try:
        # Until the loop runs, SIGINT/SIGTERM stop the start-up at once (Interrupted); from then on they
        # ask the loop to stop after its current step. The ExitStack holds the run directory's lock.
        with GracefulStop(immediate=True, announce=d.is_main) as stop, contextlib.ExitStack() as held:
            return run(parsed, d, device_name, held, stop)
    finally:
        distributed.teardown(d)


def run(parsed, d: Dist, device_name: str, held: contextlib.ExitStack, stop: GracefulStop) -> int:
    """Config -> data -> run dir (rank 0: locked, with a status) -> model -> loop -> export."""
    cfg, args, notes, resume, init = parsed.config, parsed.args, [], None, None
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
        init = load_export(cfg.init_from, "cpu")
        cfg = init_config(cfg, init[2], parsed.cli)
    compute = setup_compute(device_name if d.enabled else cfg.device, cfg.dtype, cfg.torch_compile)
    given = tokenizer_from_dict(resume.meta["tokenizer"]) if resume else init[1] if init else None
    if not d.is_main:
        distributed.barrier(d)  # rank 0 tokenizes and fills the cache first; the others then hit it
    if cfg.aim_logging and d.is_main:
        writable_dir(cfg.aim_repo, "--aim-repo")  # now, not once the run directory exists
    corpus = prepare_corpus(cfg, given)  # before any run directory: a bad --data costs nothing
    if resume:
        check_same_corpus(resume.meta.get("data"), corpus)
        if resume.iteration >= cfg.max_iters and (run_dir / "artifacts" / "export" / "export.json").is_file():
            print(f"{run_dir.name} already trained to max_iters={cfg.max_iters} and has its export: nothing left to "
                  f"train; pass --max-iters N (more than {resume.iteration}) to train it further")
            return 0
    cfg, prompt_note = check_sample_prompt(cfg, corpus)
    estimate = estimate_run(cfg, corpus.tokenizer.vocab_size, compute.device, compute.dtype, d.world_size,
                            resume.iteration if resume else 0)
    check_fits(estimate, compute.device)  # what cannot fit is refused now, not found out by allocating
    notes += [prompt_note, *describe(estimate, compute.device)]
    status = RunStatus(Path(), enabled=False)
    if d.is_main:
        distributed.barrier(d)
        with stop.deferred():  # a run directory never exists without its lock and its status
            if not resume:
                run_dir = create_run_dir(cfg.runs_dir, cfg.run_tag)
                held.enter_context(RunLock(run_dir))
            status = RunStatus(run_dir)
            status.start(iteration=resume.iteration if resume else 0, world_size=d.world_size)
    run_dir = distributed.broadcast(d, run_dir if d.is_main else None)
    log_name = "train.log" if d.is_main else f"train.rank{d.rank}.log"
    close_log = setup_console_log(run_dir / "logs" / log_name, console=d.is_main)
    trainer = None
    try:
        if d.is_main and resume:
            atomic_write_json(run_dir / "meta" / "full_config.json", cfg.to_dict())  # e.g. a longer max_iters
        elif d.is_main:
            write_meta(run_dir, cfg.to_dict(), parsed.files, PROJECT_DIR)
        print(f"run {run_dir}" + (f" | rank {d.rank} of {d.world_size}" if d.enabled else ""))
        for note in [*notes, corpus.source.note, *compute.notes]:
            if note:
                print(note)
        n_tokens = sum(len(s) for s in corpus.splits.values())
        print(f"data {corpus.source.name}: {len(corpus.source.text):,} characters -> {n_tokens:,} {cfg.tokenizer} "
              f"tokens (vocab {corpus.tokenizer.vocab_size:,}; token cache {corpus.cache})")
        trainer = build_trainer(cfg, corpus, compute, run_dir, status, d, resume, init)
        # From here a signal only asks to stop: the loop ends after its current step, and one that comes
        # while the export is written lets it finish, so status.json always records how the run ended.
        stop.immediate = False
        return finish(trainer, trainer.run(stop), stop)
    except Interrupted as e:
        status.finish("interrupted", stop_reason=str(e))
        then = f"continue with: python train.py --resume {run_dir}" if resume else "nothing was trained"
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
                  d: Dist, resume: Checkpoint | None, init) -> Trainer:
    """Model (fresh, fine-tuned or resumed), optimizer, DDP and compile wrappers, and (rank 0) tracking."""
    device, dtype, compiled = compute.device, compute.dtype, compute.compiled
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw_model = LanguageModel(cfg, corpus.tokenizer.vocab_size).to(device)
    if init:
        raw_model.load_state_dict(init[0].state_dict())
        if d.is_main:
            source = record_init_source(run_dir, cfg.init_from)
            status.update(init_from=source)
            print(f"initialized from {source}")
    torch.manual_seed(cfg.seed + d.rank)  # but each rank its own dropout masks
    optimizer = build_optimizer(raw_model, cfg, device)
    trainer = Trainer(cfg, raw_model, raw_model, optimizer, corpus.splits, corpus.tokenizer, device, dtype, run_dir,
                      Tracker(), status, d, data=corpus.identity)
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
    print(f"model {raw_model.num_params() / 1e6:.2f}M parameters | device {device} | {str(dtype)[6:]} "
          f"| compile {'on' if compiled else 'off'}{' (auto)' if cfg.torch_compile == 'auto' else ''} "
          f"| {cfg.tokens_per_step * d.world_size:,} tokens/step"
          + (f" ({d.world_size} ranks)" if d.enabled else ""))
    if d.is_main:
        extra = {"git": git_summary(PROJECT_DIR), "python": sys.version.split()[0], "torch": torch.__version__}
        trainer.tracker = build_tracker(run_dir, cfg.to_dict(), extra, cfg.aim_logging, cfg.aim_repo,
                                        cfg.run_tag, trainer.aim_run_hash, trainer.iteration + 1)
        trainer.aim_run_hash = trainer.tracker.run_hash or trainer.aim_run_hash
    if trainer.aim_run_hash:
        status.update(aim_run_hash=trainer.aim_run_hash)  # a resumed run continues the same Aim run
    return trainer


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


def finish(trainer: Trainer, reason: str, stop: GracefulStop) -> int:
    """Export (the best weights if early stopping ended the run), sample, and close the status."""
    run_dir, cfg = trainer.run_dir, trainer.cfg
    if not trainer.d.is_main:  # rank 0 writes the export and the status
        return stop.exit_code if reason == "interrupted" else 0
    if reason == "early_stopping":
        print(f"early stopping: val loss has not improved for {cfg.early_stopping_patience} evals; "
              + restore_best(trainer))
    save_export(run_dir / "artifacts" / "export", trainer.raw_model, cfg.to_dict(), trainer.tokenizer.to_dict())
    print(f"exported to {run_dir / 'artifacts' / 'export'}")
    if cfg.sample_length and reason != "interrupted":
        print("sample:\n" + sample_text(trainer.raw_model, trainer.tokenizer, cfg, trainer.device))
    metrics = {"iteration": trainer.iteration, "best_val_loss": trainer.best_val_loss, "stop_reason": reason}
    if reason == "interrupted":
        trainer.status.finish("interrupted", **metrics)
        print(f"interrupted at iteration {trainer.iteration}; continue with: python train.py --resume {run_dir}")
        return stop.exit_code
    trainer.status.finish("completed", **metrics)
    print(summary(trainer))
    return 0


def summary(trainer: Trainer) -> str:
    """The end of a completed run: what it took, what it reached, where it went, what to type next."""
    cfg, run_dir = trainer.cfg, trainer.run_dir
    tokens = trainer.iteration * cfg.tokens_per_step * trainer.d.world_size
    best = (f"best val loss {trainer.best_val_loss:.4f} at step {trainer.best_step}"
            if math.isfinite(trainer.best_val_loss) else "no eval")
    return (f"done in {format_duration(time.perf_counter() - trainer.started)}: {trainer.iteration:,} steps, "
            f"{tokens:,} tokens; {best}; export {run_dir / 'artifacts' / 'export'}\n"
            f"next: python inference.py --run {run_dir} --prompt \"...\"   |   tensorboard --logdir {run_dir.parent}")


if __name__ == "__main__":
    run_main(main)

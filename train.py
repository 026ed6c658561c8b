"""Train a GPT-style language model; each run gets its own directory under runs/.

    python train.py --run-tag baseline [--config debug] [--n-layer 6 ...]
    python train.py --help            # every config key, with its default
    python train.py --print-config    # the merged config, then exit

The run directory holds the metadata to reproduce the run (meta/), the console log and TensorBoard
events (logs/), and the safetensors export that inference.py loads (artifacts/export/).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from config import PROJECT_DIR, config_yaml, load_config
from data import get_batch, load_text, split_tokens, tokenize_cached
from model import LanguageModel
from parameters import ModelConfig
from tokenizer import build_tokenizer
from utils.checkpoint import save_export
from utils.cli import run_main
from utils.console import format_duration, setup_console_log
from utils.device import autocast, resolve_device, resolve_dtype, setup_backends
from utils.runs import RunStatus, create_run_dir, git_summary, write_meta
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


def prepare_data(cfg: ModelConfig):
    """Text -> tokenizer -> cached token ids -> train/val splits. Runs before any run dir exists,
    so a bad --data or a too-short corpus costs nothing."""
    source = load_text(cfg.data, cfg.data_dir)
    tokenizer = build_tokenizer(cfg.tokenizer, source.text)
    tokens, cache_hit = tokenize_cached(source.text, tokenizer, cfg.data_dir)
    splits = split_tokens(tokens, cfg.val_fraction, cfg.block_size)
    return source, tokenizer, splits, cache_hit


def train_step(model, optimizer, scaler, tokens, cfg: ModelConfig, step: int, device, ctx):
    """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) as
    tensors, unsynchronized. The caller zeroes the gradients (after any histogram logging)."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum_steps):
        with torch.profiler.record_function("data"):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed,
                             step=step * cfg.grad_accum_steps + micro, device=device)
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
def estimate_loss(model: torch.nn.Module, splits: dict, cfg: ModelConfig, device: torch.device, ctx) -> dict[str, float]:
    """Mean loss over eval_iters fixed batches per split, in eval mode (no dropout)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            x, y = get_batch(splits[split], cfg.batch_size, cfg.block_size, seed=cfg.seed + EVAL_SEED_OFFSET,
                             step=k, split=split, device=device)
            with ctx:
                _, loss = model(x, y)
            losses[k] = loss.float().item()
        out[split] = losses.mean().item()
    model.train()
    return out


def sample_text(model: LanguageModel, tokenizer, cfg: ModelConfig, device: torch.device) -> str:
    """A short sample from the training prompt, with a fixed seed so samples are comparable across evals."""
    was_training = model.training
    model.eval()
    prompt = torch.tensor([tokenizer.encode(cfg.sample_prompt)], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = model.generate(prompt, cfg.sample_length, temperature=0.8, top_k=200, generator=gen)
    model.train(was_training)
    return tokenizer.decode(out[0, prompt.shape[1]:].tolist())


def train(model, raw_model, optimizer, splits, tokenizer, cfg: ModelConfig, device, dtype, tracker: Tracker,
          status: RunStatus) -> dict:
    """The training loop. Reads .item() only on logging steps, so the device is never made to wait."""
    ctx = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    best_val, evals, loss_sum = float("inf"), {}, torch.zeros((), device=device)
    window_start, window_steps, train_time = time.perf_counter(), 0, 0.0
    for step in range(cfg.max_iters):
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, grad_norm = train_step(model, optimizer, scaler, splits["train"], cfg, step, device, ctx)
        loss_sum += loss
        done, window_steps = step + 1, window_steps + 1
        if cfg.histogram_interval and done % cfg.histogram_interval == 0:
            tracker.log_histograms(done, raw_model)  # before zero_grad, while the gradients exist
        optimizer.zero_grad(set_to_none=True)

        last = done == cfg.max_iters
        if done % cfg.log_interval == 0 or last:
            train_loss = (loss_sum / window_steps).item()  # the one sync of a logging step
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            tok_s = window_steps * cfg.tokens_per_step / elapsed
            eta = (cfg.max_iters - done) * train_time / done
            print(f"step {done:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} "
                  f"| {tok_s / 1e3:,.1f}k tok/s | ETA {format_duration(eta)}", flush=True)
            tracker.log_scalars(done, {"loss": train_loss}, subset="train")
            tracker.log_scalars(done, {"lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tok_s})
            loss_sum.zero_()
            window_steps, window_start = 0, time.perf_counter()
        if done % cfg.eval_interval == 0 or last:
            evals = evaluate(model, raw_model, splits, tokenizer, cfg, device, ctx, tracker, done)
            best_val = min(best_val, evals["val"])
            status.update(iteration=done, train_loss=evals["train"], val_loss=evals["val"], best_val_loss=best_val)
            window_start = time.perf_counter()  # eval time is not training time
    return {"iteration": cfg.max_iters, "train_loss": evals["train"], "val_loss": evals["val"],
            "best_val_loss": best_val, "train_seconds": round(train_time, 2)}


def evaluate(model, raw_model, splits, tokenizer, cfg, device, ctx, tracker: Tracker, step: int) -> dict:
    """Loss on both splits, printed and tracked, plus a text sample for TensorBoard/Aim."""
    losses = estimate_loss(model, splits, cfg, device, ctx)
    print(f"eval step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
    for split, value in losses.items():
        tracker.log_scalars(step, {"eval_loss": value}, subset=split)
    if cfg.sample_length:
        tracker.log_text(step, "sample", sample_text(raw_model, tokenizer, cfg, device))
    return losses


def main(argv: list[str] | None = None) -> int:
    parsed = load_config(argv, description=__doc__)
    cfg = parsed.config
    if parsed.args.print_config:
        print(config_yaml(cfg, parsed.files), end="")
        return 0
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    setup_backends(device)
    source, tokenizer, splits, cache_hit = prepare_data(cfg)

    run_dir = create_run_dir(cfg.runs_dir, cfg.run_tag)
    write_meta(run_dir, cfg.to_dict(), parsed.files, PROJECT_DIR)
    close_log = setup_console_log(run_dir / "logs" / "train.log")
    status = RunStatus(run_dir)
    status.start(iteration=0)
    tracker = Tracker()
    try:
        print(f"run {run_dir}")
        if source.note:
            print(source.note)
        n_tokens = sum(len(s) for s in splits.values())
        print(f"data {source.name}: {len(source.text):,} characters -> {n_tokens:,} {cfg.tokenizer} tokens "
              f"(vocab {tokenizer.vocab_size:,}; token cache {'hit' if cache_hit else 'written'})")
        torch.manual_seed(cfg.seed)
        raw_model = LanguageModel(cfg, tokenizer.vocab_size).to(device)
        model = compile_model(raw_model, device) if cfg.torch_compile else raw_model
        optimizer = build_optimizer(raw_model, cfg, device)
        print(f"model {raw_model.num_params() / 1e6:.2f}M parameters | device {device} | {str(dtype)[6:]} "
              f"| compile {cfg.torch_compile} | {cfg.tokens_per_step:,} tokens/step")
        extra = {"git": git_summary(PROJECT_DIR), "python": sys.version.split()[0], "torch": torch.__version__}
        tracker = build_tracker(run_dir, cfg.to_dict(), extra, cfg.aim_logging, cfg.aim_repo, cfg.run_tag)
        if tracker.run_hash:
            status.update(aim_run_hash=tracker.run_hash)  # so a resumed run continues the same Aim run
        metrics = train(model, raw_model, optimizer, splits, tokenizer, cfg, device, dtype, tracker, status)
        save_export(run_dir / "artifacts" / "export", raw_model, cfg.to_dict(), tokenizer.to_dict())
        print(f"exported to {run_dir / 'artifacts' / 'export'}")
        if cfg.sample_length:
            print("sample:\n" + sample_text(raw_model, tokenizer, cfg, device))
        status.finish("completed", **metrics)
    except KeyboardInterrupt:
        status.finish("interrupted")
        raise
    except BaseException as e:
        status.finish("failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        tracker.close()
        close_log()
    return 0


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile; inductor has no MPS backend, so MPS gets aot_eager. Exports use the raw model."""
    return torch.compile(model, backend="aot_eager" if device.type == "mps" else "inductor")


if __name__ == "__main__":
    run_main(main)

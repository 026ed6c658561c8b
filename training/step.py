"""One optimizer step, and the loss of the fixed eval batches: what train.py's loop and profile_model.py run.

    loss, grad_norm = train_step(model, optimizer, tokens, step, cfg, scaler=scaler, ctx=ctx, device=device)
    losses = estimate_loss(model, splits, cfg, device, ctx)          # {"train": ..., "val": ...}
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from parameters import ModelConfig
from training.batches import get_batch, step_targets
from utils import distributed
from utils.distributed import Dist, is_dtensor


EVAL_SEED_OFFSET = 1  # eval batches: a fixed set drawn with seed + 1, so every eval scores the same text



def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile; inductor has no MPS backend, so MPS gets aot_eager. Exports use the raw model."""
    return torch.compile(model, backend="aot_eager" if device.type == "mps" else "inductor")



def batch_step(step: int, cfg: ModelConfig) -> int:
    """The step whose batch step `step` trains on: itself, or with overfit_batches N, step % N. Training on
    N fixed batches is the debug mode that proves model and loss are wired up: the loss must fall near 0."""
    return step % cfg.overfit_batches if cfg.overfit_batches else step



def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens, step: int, cfg: ModelConfig, *,
               scaler: torch.amp.GradScaler, ctx, device: torch.device, d: Dist = Dist()):
    """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) as
    tensors, unsynchronized. The caller zeroes the gradients (after any histogram logging).
    Under DDP each rank takes its slice of the step's global batch, and gradients are all-reduced
    only on the last micro-step (no_sync before it). Under fsdp they are reduce-scattered at every
    micro-step: skipping it would hold whole, unsharded gradients between micro-steps, the memory fsdp
    exists to save.

    The loss is the mean over the trained targets of the whole step (every micro-batch of every rank),
    so accumulation and DDP give the gradient of one big batch. Token windows train on every target, so
    that is each micro-batch's mean / grad_accum_steps; with pairs, where micro-batches hold different
    numbers of response tokens, each micro-batch's mean is weighted by its share of the step's targets
    (times world_size, as DDP and fsdp average the ranks' gradients)."""
    ddp = getattr(model, "_orig_mod", model)  # torch.compile wraps the DDP module
    n_micro, at = cfg.grad_accum_steps, batch_step(step, cfg)
    targets = step_targets(tokens, cfg.batch_size, seed=cfg.seed, step=at, n_micro=n_micro,
                           world_size=d.world_size)  # None: every target is trained
    loss_sum = torch.zeros((), device=device)
    for micro in range(n_micro):
        with torch.profiler.record_function("data"):
            x, y = get_batch(tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed, step=at, micro=micro,
                             n_micro=n_micro, rank=d.rank, world_size=d.world_size, device=device)
        last = micro == n_micro - 1
        with ddp.no_sync() if isinstance(ddp, DDP) and not last else contextlib.nullcontext():
            with torch.profiler.record_function("forward"), ctx:
                _, loss = model(x, y)
            if targets is None:
                scaled = loss / n_micro
            else:
                scaled = loss * float(targets[d.rank * n_micro + micro] * d.world_size / targets.sum())
            with torch.profiler.record_function("backward"):
                scaler.scale(scaled).backward()
        loss_sum += (loss if targets is None else scaled).detach()
    # Pairs: this rank's part of the step's mean, x world_size; window_losses' mean over ranks is the mean.
    loss = loss_sum / n_micro if targets is None else loss_sum
    with torch.profiler.record_function("optimizer"):
        scaler.unscale_(optimizer)
        grad_norm = gradient_norm(model, cfg.grad_clip)
        # float16's GradScaler skips a step with inf gradients itself (and lowers its scale). Otherwise a
        # non-finite gradient would turn every weight it touches into NaN, so the step stops here, before the
        # update. This costs one host sync per step: nothing on a CPU, a short pipeline bubble on a GPU.
        if not scaler.is_enabled() and not torch.isfinite(grad_norm):
            raise NonFiniteStep(loss.item(), grad_norm.item())
        scaler.step(optimizer)
        scaler.update()
    return loss, grad_norm



class NonFiniteStep(ValueError):
    """A step whose gradients are not finite, stopped before the optimizer applied them."""

    def __init__(self, loss: float, grad_norm: float) -> None:
        self.loss, self.grad_norm = loss, grad_norm
        super().__init__(f"gradient norm {grad_norm} (loss {loss:.4f}): the step was not applied")



def gradient_norm(model: torch.nn.Module, grad_clip: float) -> torch.Tensor:
    """The global gradient norm, clipping the gradients to grad_clip (0: measured only, nothing rescaled).
    Under fsdp each rank's norm covers its shards: full_tensor() sums the squares over ranks, so every
    rank clips by, and reports, the whole model's norm (torchtitan's clip does the same)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if is_dtensor(norm):
        norm = norm.full_tensor()
    if grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    return norm



@torch.no_grad()
def estimate_loss(model: torch.nn.Module, splits: dict, cfg: ModelConfig, device: torch.device, ctx,
                  d: Dist = Dist(), stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
    """Mean loss over eval_iters fixed batches per split, in eval mode (no dropout); under DDP each
    rank scores its slice and the means are averaged, so every rank gets the same numbers. None when
    `stop` (asked before each batch, and the same on every rank) says to stop: a Ctrl-C does not wait
    for a long eval."""
    model.eval()
    losses = torch.zeros(2, cfg.eval_iters, device=device)
    try:
        for i, split in enumerate(("train", "val")):
            for k in range(cfg.eval_iters):
                if stop():
                    return None
                x, y = get_batch(splits[split], cfg.batch_size, cfg.block_size, seed=cfg.seed + EVAL_SEED_OFFSET,
                                 step=k, split=split, rank=d.rank, world_size=d.world_size, device=device)
                with ctx:
                    _, loss = model(x, y)
                losses[i, k] = loss.float()
    finally:
        model.train()
    train, val = distributed.mean_across(d, losses.mean(dim=1)).tolist()
    return {"train": train, "val": val}

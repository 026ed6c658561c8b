"""Before a run starts: the memory it needs and the time it takes, from its shape alone.

    est = estimate_run(cfg, vocab_size, device, dtype, world_size=1, done_iters=0)
    check_fits(est, device)        # a ValueError, before any run directory exists, if it cannot fit
    print(describe(est))           # "memory ~1.2 GB of 23 GB | ~48 ms/step, ~1m50s for 2,000 steps + 9 evals"

Memory: weights, gradients and AdamW's two moments (16 bytes per parameter; under fsdp each rank holds
1/world_size of them, plus what it holds whole at once: the root, two blocks' gathered weights and one
block's gradients; state_bytes), plus the activations one micro-batch saves for backward. The
activation model was fitted to the bytes autograd saves in model.py on CPU (saved_tensors_hooks,
float32; within 5% on four shapes): about 16.5 bytes x 4 per (layer, token, channel); with dropout 2.5
more; on CPU, where the attention is written out (with dropout, or short blocks in half precision),
the probabilities it keeps; and the logits 3 times over (log-softmax, its gradient, the head).
Time: training FLOPs (model.flops_per_token's formula) over a square matmul's rate measured here in
the run's dtype, at the utilization this project measured (README, Performance). A small model
reaches far less than that (its matmuls are small, and casts, norms and the optimizer weigh more: the
default recipe in bf16 on a Zen 5 took 5x the FLOPs' time), so a step the FLOPs put under
TIMED_STEP_S is timed for real instead, on a copy of the model: a few passes, a second at most. Either
way the loop's measured ETA replaces the estimate after its first log line.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from architectures.layers import WRITTEN_OUT_MAX_T
from corpus.text import tokenizing_bytes
from model import LanguageModel
from parameters import ModelConfig
from training.parallelize import apply_activation_checkpointing, checkpointed_blocks
from utils.console import format_duration
from utils.device import autocast, matmul_flops, synchronize

# Utilization of the measured matmul rate that a training step reaches: the default recipe measured
# 49% and shakespeare_char 74-76% on a 2-core EPYC (README); on CUDA nanoGPT-sized models without
# compile reach roughly a third of peak.
UTILIZATION = {"cpu": 0.5, "cuda": 0.35, "mps": 0.3}
HOURS_WARNING_S = 3600
TIMED_STEP_S = 0.3   # steps the FLOPs put below this are timed on the model itself (TIMED_PASSES of them)
TIMED_PASSES = 3


@dataclass(frozen=True)
class Estimate:
    params: int
    state_bytes: int        # weights, gradients and optimizer moments
    activation_bytes: int   # what one micro-batch keeps for backward, at its peak
    device_bytes: int       # the device's memory (CPU: physical memory, shared by ranks on it)
    available_bytes: int    # what is free now (CPU: MemAvailable)
    step_seconds: float
    total_seconds: float    # the remaining steps and evals
    steps: int
    evals: int
    rate: float             # the measured matmul FLOP/s behind the time
    timed: bool = False     # step_seconds was timed on the model, not derived from the matmul rate
    shards: int = 1         # fsdp: the ranks the state is sharded over (memory is per rank)

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes


def _linear_in_layers(cfg: ModelConfig, vocab_size: int, measure: Callable[[LanguageModel], int]) -> int:
    """measure(LanguageModel(cfg, vocab_size)) for any architecture, without allocating it: the
    model is built on the meta device with 1 and 2 layers and extrapolated, since parameter and
    FLOP counts grow linearly with n_layer (and a million meta layers would still take minutes)."""
    with torch.device("meta"):
        one, two = (measure(LanguageModel(dataclasses.replace(cfg, n_layer=n), vocab_size)) for n in (1, 2))
    return one + (cfg.n_layer - 1) * (two - one)


def count_params(cfg: ModelConfig, vocab_size: int) -> int:
    """LanguageModel(cfg, vocab_size).num_params()."""
    return _linear_in_layers(cfg, vocab_size, LanguageModel.num_params)


def state_bytes(cfg: ModelConfig, vocab_size: int, world_size: int) -> tuple[int, int]:
    """(Bytes one rank holds of weights, gradients and AdamW's moments; the ranks they are sharded over).
    fsdp on N ranks: 16/N bytes per parameter, plus the units gathered whole at once in float32 (the root,
    which stays gathered from its forward to its backward, a block and the next one prefetched) and one
    block's whole gradients before they are reduce-scattered."""
    params = count_params(cfg, vocab_size)
    if cfg.parallelism != "fsdp" or world_size < 2:
        return 16 * params, 1
    block = count_params(dataclasses.replace(cfg, n_layer=2), vocab_size) - \
        count_params(dataclasses.replace(cfg, n_layer=1), vocab_size)
    root = params - cfg.n_layer * block
    return 16 * params // world_size + 4 * (root + 3 * block), world_size


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> int:
    """LanguageModel(cfg, vocab_size).flops_per_token()."""
    return _linear_in_layers(cfg, vocab_size, LanguageModel.flops_per_token)


def activation_bytes(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> int:
    B, T, C, L, H = cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head
    per_value = 4 if dtype == torch.float32 else 2
    dropout = cfg.dropout > 0
    layer = B * T * C * per_value * (16.5 + 2.5 * dropout)
    if device.type == "cpu" and (dropout or (dtype != torch.float32 and T <= WRITTEN_OUT_MAX_T)):
        # the written-out attention (architectures/layers.py) keeps its probabilities: with dropout three
        # tensors of them; without, in half precision, the softmax's output once (2 bytes each, measured)
        layer += B * H * T * T * per_value * (3 if dropout else 1)
    # A checkpointed block keeps only its input, and the backward holds one block's activations at a time
    # while it recomputes them (training/parallelize.py).
    recomputed = len(checkpointed_blocks(cfg))
    acts = (L - recomputed) * layer + recomputed * B * T * C * per_value + (layer if recomputed else 0)
    return int(acts + 3 * B * T * vocab_size * 4)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(total, available now) bytes of the device's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    return host_memory()


def host_memory() -> tuple[int, int]:
    """(physical memory, available now) in bytes; available is MemAvailable on Linux, else the total."""
    total = available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        meminfo = dict(line.split(":", 1) for line in lines if ":" in line)
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    return total, available


def estimate_run(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype,
                 world_size: int = 1, done_iters: int = 0) -> Estimate:
    params = count_params(cfg, vocab_size)
    state, shards = state_bytes(cfg, vocab_size, world_size)
    acts = activation_bytes(cfg, vocab_size, device, dtype)
    total, available = device_memory(device)
    if device.type != "cuda":  # the ranks of a CPU run share the host's memory
        state, acts = state * world_size, acts * world_size
    # One square matmul in nn.Linear's layout, best of two: tens of ms on a CPU.
    rate = matmul_flops(4096 if device.type == "cuda" else 1024, "x @ W.T", device, dtype, repeats=2)
    rate *= UTILIZATION.get(device.type, 0.3)
    step = flops_per_token(cfg, vocab_size) * cfg.tokens_per_step / rate
    step *= 1 + len(checkpointed_blocks(cfg)) / cfg.n_layer / 3  # a recomputed block runs its forward twice
    timed = step < TIMED_STEP_S and acts + state < available
    if timed:
        step = timed_step(cfg, vocab_size, device, dtype)
    # An eval batch is a forward pass: about a third of a micro-step's forward and backward.
    eval_seconds = 2 * cfg.eval_iters * step / cfg.grad_accum_steps / 3
    steps = max(0, cfg.max_iters - done_iters)
    evals = steps // cfg.eval_interval + 1
    return Estimate(params, state, acts, total, available, step, steps * step + evals * eval_seconds, steps, evals,
                    rate / UTILIZATION.get(device.type, 0.3), timed, shards)


def timed_step(cfg: ModelConfig, vocab_size: int, device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of one optimizer step (every micro-step's forward and backward, clipping, the optimizer) on a
    fresh copy of the model, best of TIMED_PASSES after a warm-up one; the run's RNG streams are untouched."""
    from training.optim import build_optimizer  # the run's own optimizer: Muon's cost is not AdamW's

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = LanguageModel(cfg, vocab_size).to(device)
        apply_activation_checkpointing(model, cfg)
        optimizer = build_optimizer(model, cfg, device)
        x = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size), device=device)
        best = float("inf")
        for _ in range(TIMED_PASSES + 1):
            synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, dtype):
                _, loss = model(x, x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    # the optimizer runs once per step, the micro-steps grad_accum_steps times: counting it each time errs long
    return best * cfg.grad_accum_steps


def check_tokenizing_fits(cfg: ModelConfig) -> None:
    """Refuse in one line, before reading it, a corpus whose tokenizing would not fit in the memory
    available now (it is read and tokenized whole; prepare_data.py will stream instead)."""
    size, needed = tokenizing_bytes(cfg.data, cfg.tokenizer)
    available = host_memory()[1]
    if needed > available:
        raise ValueError(f"tokenizing {cfg.data} ({size / 1e6:,.0f} MB of text) takes about {needed / 1e9:,.1f} GB of "
                         f"memory, more than the {available / 1e9:,.1f} GB available; use a smaller corpus or a "
                         "machine with more memory")


def check_fits(est: Estimate, device: torch.device) -> None:
    """A one-line ValueError if the run cannot fit in the device's memory at all."""
    if est.peak_bytes > est.device_bytes:
        where = f"per rank, sharded over {est.shards}" if est.shards > 1 else "on every rank under ddp"
        raise ValueError(
            f"this run needs about {_gb(est.peak_bytes)} ({est.params / 1e6:,.1f}M parameters: {_gb(est.state_bytes)} "
            f"for weights, gradients and AdamW {where}; {_gb(est.activation_bytes)} of activations per micro-batch) "
            f"but {device.type} has {_gb(est.device_bytes)}; lower n_layer, n_embd, block_size or batch_size (raise "
            "grad_accum_steps to keep the batch), turn on --activation-checkpointing full, or shard the model over "
            "more GPUs with torchrun and --parallelism fsdp")


def describe(est: Estimate, device: torch.device) -> list[str]:
    """The estimate line, and a warning when it is tight on memory or hours long."""
    basis = ("a step of this model timed here" if est.timed else f"a {est.rate / 1e12:.3f} TFLOP/s matmul measured "
             f"here, {UTILIZATION.get(device.type, 0.3):.0%} of it assumed")
    per_rank = f" per rank (fsdp over {est.shards})" if est.shards > 1 and device.type == "cuda" else ""
    lines = [f"estimate: memory ~{_gb(est.peak_bytes)}{per_rank} of {_gb(est.available_bytes)} available | "
             f"~{est.step_seconds * 1e3:,.0f} ms/step, ~{format_duration(est.total_seconds)} for {est.steps:,} steps "
             f"and {est.evals} evals ({basis})"]
    if est.peak_bytes > est.available_bytes:
        lines.append(f"warning: the run needs about {_gb(est.peak_bytes)}, more than the {_gb(est.available_bytes)} "
                     "free now: expect swapping or an out-of-memory kill")
    if est.total_seconds > HOURS_WARNING_S:
        smaller = "the default recipe (python train.py, minutes on a CPU) or --config debug (seconds)"
        lines.append(f"warning: that is hours on this {device.type}; for a first run, try {smaller}")
    return lines


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.0f} MB"

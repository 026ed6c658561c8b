"""Activation checkpointing: gradients against the plain model, then peak memory and step time per mode.

    python benchmarks/activation_memory.py --device cuda                    # GPT-2 small, batch 16 x 1024
    python benchmarks/activation_memory.py --device cpu --n-layer 2 --n-embd 64 --block-size 64 --batch-size 2

1. float32 gradients of a small model with dropout, none against full and selective (equal tensors).
2. A GPT-2-shaped model (50,304 vocabulary) in bf16 autocast with AdamW: per mode (none, selective, full),
   eager and, on CUDA, compiled: ms per step (best of 5 after 3 warm-up steps) and, on CUDA, the peak
   allocated memory, beside the start-up estimate of the activations (training/estimate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import LanguageModel  # noqa: E402
from parameters import ModelConfig  # noqa: E402
from training.estimate import activation_bytes  # noqa: E402
from training.parallelize import apply_activation_checkpointing  # noqa: E402
from training.step import compile_model  # noqa: E402
from utils.device import autocast, synchronize  # noqa: E402

VOCAB = 50304


def gradients(device: torch.device, mode: str) -> dict[str, torch.Tensor]:
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1, activation_checkpointing=mode)
    torch.manual_seed(0)
    model = LanguageModel(cfg, 100).to(device)
    apply_activation_checkpointing(model, cfg)
    x = torch.randint(0, 100, (8, 128), generator=torch.Generator().manual_seed(1)).to(device)
    torch.manual_seed(2)
    _, loss = model(x, x)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    device = torch.device(args.device)

    plain = gradients(device, "none")
    for mode in ("full", "selective"):
        g = gradients(device, mode)
        print(f"float32 gradients, {mode} against none: {sum(torch.equal(g[n], plain[n]) for n in plain)} of "
              f"{len(plain)} tensors equal, max abs difference {max((g[n] - plain[n]).abs().max().item() for n in plain):.3g}")

    base = ModelConfig(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd, block_size=args.block_size,
                       batch_size=args.batch_size, bias=True, dropout=0.0)
    for compiled in (False, True) if device.type == "cuda" else (False,):
        for mode in ("none", "selective", "full"):
            cfg = dataclasses.replace(base, activation_checkpointing=mode)
            ms, peak, state = time_steps(cfg, device, compiled)
            shown = f", peak allocated {peak / 2**30:.2f} GiB" if device.type == "cuda" else ""
            print(f"compile={compiled} {mode:9} {ms:7.1f} ms/step{shown} (weights, gradients, AdamW {state / 2**30:.2f} "
                  f"GiB; estimated activations {activation_bytes(cfg, VOCAB, device, torch.bfloat16) / 2**30:.2f} GiB)")
            if device.type == "cuda":
                torch.cuda.empty_cache()


def time_steps(cfg: ModelConfig, device: torch.device, compiled: bool) -> tuple[float, int, int]:
    """(best ms per step of 5 after 3 warm-up ones, peak allocated bytes on CUDA, 16 bytes per parameter)."""
    torch.manual_seed(0)
    model = LanguageModel(cfg, VOCAB).to(device)
    apply_activation_checkpointing(model, cfg)
    run = compile_model(model, device) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB, (cfg.batch_size, cfg.block_size), device=device)

    def step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, torch.bfloat16):
            _, loss = run(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - t0
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = min(step() for _ in range(5)) * 1000
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return ms, peak, 16 * model.num_params()

if __name__ == "__main__":
    main()

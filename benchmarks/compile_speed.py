"""Is torch.compile worth it on this machine? The evidence behind `torch_compile: auto`.

    python benchmarks/compile_speed.py [--config shakespeare_char] [--batch-size 16] [--rounds 3] [--steps 5]

Builds the same model twice, eager and compiled (as train.py compiles it), and times train.py's own
train_step on each, alternating rounds so a drifting machine affects both alike. Prints the compile
time (the first compiled step minus an eager one), ms/step each way, the speed-up, and how many
steps a run needs before the compile time is earned back.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import add_config_arg, load_config  # noqa: E402
from data import prepare_corpus  # noqa: E402
from model import LanguageModel  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import compile_model, train_step  # noqa: E402
from utils.device import autocast, setup_compute, synchronize  # noqa: E402


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_arg(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating eager/compiled rounds (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (default 5)")


def main(argv: list[str] | None = None) -> None:
    parsed = load_config(argv, description=__doc__, add_stage_args=add_args)
    cfg, args = parsed.config, parsed.args
    compute = setup_compute(cfg.device, cfg.dtype, "false")  # compiled or not is what this script varies
    device, dtype = compute.device, compute.dtype
    corpus = prepare_corpus(cfg)
    tokenizer, splits = corpus.tokenizer, corpus.splits
    ctx = autocast(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    runs = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(cfg.seed)
        raw = LanguageModel(cfg, tokenizer.vocab_size).to(device)
        model = compile_model(raw, device) if name == "compiled" else raw
        runs[name] = (model, build_optimizer(raw, cfg, device), [])
    step = 0

    def timed(name: str) -> float:
        nonlocal step
        model, optimizer, _ = runs[name]
        t0 = time.perf_counter()
        train_step(model, optimizer, splits["train"], step, cfg, scaler=scaler, ctx=ctx, device=device)
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step += 1
        return time.perf_counter() - t0

    timed("eager")  # warm-up
    eager_first = timed("eager")
    compile_s = timed("compiled") - eager_first
    timed("compiled")  # the backward graph's first use may still compile
    for _ in range(args.rounds):
        for name in ("eager", "compiled"):
            runs[name][2].extend(timed(name) for _ in range(args.steps))
    eager, compiled = (statistics.median(runs[n][2]) * 1e3 for n in ("eager", "compiled"))
    saved = (eager - compiled) / 1e3
    print(f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size}, {device}, "
          f"{str(dtype)[6:]}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"compile time: {compile_s:.1f} s")
    print(f"eager: {eager:.1f} ms/step | compiled: {compiled:.1f} ms/step | speed-up {eager / compiled:.2f}x "
          f"(median of {args.rounds} x {args.steps} steps each, alternating)")
    if saved > 0:
        print(f"break-even: {compile_s / saved:,.0f} steps (this config's max_iters: {cfg.max_iters:,})")
    else:
        print("break-even: never (compiled steps are not faster)")


if __name__ == "__main__":
    main()

"""What does gptlab's deterministic CPU dropout cost against torch's own? The evidence for issue 8's fix.

    python benchmarks/dropout_cost.py [--config shakespeare_char] [--batch-size 16] [--rounds 4] [--steps 3]

model.dropout() draws CPU masks with bernoulli_(Tensor), one serial kernel on every CPU, because
torch's F.dropout (and SDPA's dropout) draws them with bernoulli_(float), which on Intel CPUs runs
MKL's generator in parallel chunks and gave run-to-run differences there. This times train.py's own
train_step with both, alternating rounds on two identical models so a drifting machine affects both
alike, and prints ms/step each way and the difference in tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as model_module  # noqa: E402
from config import add_config_arg, load_config  # noqa: E402
from data import prepare_corpus  # noqa: E402
from model import LanguageModel  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import train_step  # noqa: E402
from utils.device import autocast, setup_compute  # noqa: E402


def torch_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if p > 0 else x


def torch_attention(q, k, v, dropout_p: float, is_causal: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)


@contextlib.contextmanager
def torch_masks():
    """model.py with torch's own dropout, as before issue 8."""
    saved = model_module.dropout, model_module.causal_attention
    model_module.dropout, model_module.causal_attention = torch_dropout, torch_attention
    try:
        yield
    finally:
        model_module.dropout, model_module.causal_attention = saved


def add_args(parser: argparse.ArgumentParser) -> None:
    add_config_arg(parser)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (default 4)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")


def main(argv: list[str] | None = None) -> None:
    parsed = load_config(argv, description=__doc__, add_stage_args=add_args)
    cfg, args = parsed.config, parsed.args
    if cfg.dropout == 0:
        raise SystemExit("error: dropout is 0 in this config, so there is nothing to compare; pass --dropout 0.1")
    compute = setup_compute(cfg.device, cfg.dtype, "false")
    corpus = prepare_corpus(cfg)
    tokenizer, splits = corpus.tokenizer, corpus.splits
    ctx = autocast(compute.device, compute.dtype)
    scaler = torch.amp.GradScaler(compute.device.type, enabled=False)
    runs = {}
    for name in ("gptlab", "torch"):
        torch.manual_seed(cfg.seed)
        raw = LanguageModel(cfg, tokenizer.vocab_size).to(compute.device)
        runs[name] = (raw, build_optimizer(raw, cfg, compute.device), [])
    step = 0

    def timed(name: str) -> float:
        nonlocal step
        model, optimizer, _ = runs[name]
        with torch_masks() if name == "torch" else contextlib.nullcontext():
            t0 = time.perf_counter()
            train_step(model, optimizer, splits["train"], step, cfg, scaler=scaler, ctx=ctx, device=compute.device)
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
        step += 1
        return elapsed

    for name in runs:
        timed(name)  # warm-up
    ratios = []
    for r in range(args.rounds):  # ABBA order, so neither side always runs first (allocator, caches, clocks)
        order = ("gptlab", "torch") if r % 2 == 0 else ("torch", "gptlab")
        for name in order:
            runs[name][2].extend(timed(name) for _ in range(args.steps))
        ratios.append(statistics.median(runs["torch"][2][-args.steps:]) / statistics.median(runs["gptlab"][2][-args.steps:]))
    ours, theirs = (statistics.median(runs[n][2]) * 1e3 for n in ("gptlab", "torch"))
    print(f"{cfg.n_layer} layers, n_embd {cfg.n_embd}, block {cfg.block_size}, batch {cfg.batch_size}, dropout "
          f"{cfg.dropout}, {compute.device}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    print(f"gptlab dropout: {ours:.1f} ms/step | torch dropout: {theirs:.1f} ms/step (medians of {args.rounds} x "
          f"{args.steps} steps each)")
    print(f"gptlab's tokens/s against torch's, per round: {', '.join(f'{x - 1:+.1%}' for x in ratios)}; "
          f"median {statistics.median(ratios) - 1:+.1%}")


if __name__ == "__main__":
    main()

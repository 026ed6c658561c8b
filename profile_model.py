"""Where does a training step spend its time? Phase and op breakdown, tokens/s and MFU.

    python profile_model.py [--config debug] [--n-layer 6 ...] [--dtype bfloat16]

Runs warm-up steps, then the very step train.py runs (train.train_step) under torch.profiler; prints
the share of step time per phase (data, forward, backward, optimizer) and per op kind (attention,
linear/matmul, other), the top ops, ms/step, tokens/s and MFU against the peak of a large matmul
measured in this process. Writes the table and a Chrome trace (open in chrome://tracing or
https://ui.perfetto.dev) to profiles/<timestamp>/, and ends with one JSON line of every figure.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from config import add_config_arg, load_config
from model import LanguageModel
from train import build_optimizer, compile_model, prepare_data, train_step
from utils.cli import run_main
from utils.device import autocast, resolve_device, resolve_dtype, setup_backends, synchronize

STEP = "train_step"  # our own range around each step: the denominator of every share
PHASES = ("data", "forward", "backward", "optimizer")
ATTENTION_MARKS = ("scaled_dot_product", "ScaledDotProduct", "flash_attention", "efficient_attention")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")


def add_profile_args(parser) -> None:
    add_config_arg(parser)
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="profiled and timed steps (default 5)")
    parser.add_argument("--out-dir", default="profiles", help="where profiles/<timestamp>/ goes")


def measure_peak_flops(device: torch.device, dtype: torch.dtype, sizes=(2048, 3072), repeats: int = 3) -> float:
    """Best FLOP/s of large square matmuls in this dtype on this device: the MFU denominator."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up: kernel selection, allocation
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def op_kind(event) -> str:
    """attention if the op runs inside an SDPA call (forward or backward), else matmul or other."""
    e = event
    while e is not None:
        if any(mark in e.name for mark in ATTENTION_MARKS):
            return "attention"
        e = e.cpu_parent
    return "linear/matmul" if event.name in MATMUL_OPS else "other ops"


def breakdown(prof, on_gpu: bool) -> tuple[dict[str, float], dict[str, float], list[tuple[str, float]]]:
    """(phase shares, op-kind shares, top ops by self time in ms) from the profiler's event tree."""
    def incl(e):
        return e.device_time_total if on_gpu else e.cpu_time_total

    def self_time(e):
        return e.self_device_time_total if on_gpu else e.self_cpu_time_total

    events = prof.events()
    steps = [e for e in events if e.name == STEP]
    step_total = sum(incl(e) for e in steps)
    phases = {p: sum(incl(e) for e in events if e.name == p) / step_total for p in PHASES}
    phases["other"] = max(0.0, 1.0 - sum(phases.values()))
    kinds: dict[str, float] = {"attention": 0.0, "linear/matmul": 0.0, "other ops": 0.0}
    per_op: dict[str, float] = {}
    for e in events:
        if e.name == STEP or e.name in PHASES:
            continue
        kinds[op_kind(e)] += self_time(e) / step_total
        per_op[e.name] = per_op.get(e.name, 0.0) + self_time(e)
    top = sorted(((name, t / 1e3 / len(steps)) for name, t in per_op.items()), key=lambda kv: -kv[1])[:10]
    return phases, kinds, top


def timed_steps(run_step, n: int, device: torch.device) -> float:
    """Seconds per step over n steps, device synchronized at both ends."""
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(n):
        run_step(i)
    synchronize(device)
    return (time.perf_counter() - t0) / n


def format_report(phases, kinds, top, figures) -> str:
    lines = ["share of step time", f"  {'phase':<16}{'share':>8}"]
    lines += [f"  {name:<16}{share:>8.1%}" for name, share in phases.items()]
    lines += [f"  {'op kind':<16}{'share':>8}"]
    lines += [f"  {name:<16}{share:>8.1%}" for name, share in kinds.items()]
    lines += ["top ops by self time (ms/step)"] + [f"  {name:<48}{ms:>9.2f}" for name, ms in top]
    lines += [f"{figures['ms_per_step']:.1f} ms/step | {figures['tokens_per_sec']:,.0f} tokens/s | "
              f"{figures['model_tflops']:.3f} TFLOP/s model | peak {figures['peak_tflops']:.3f} TFLOP/s "
              f"({figures['dtype']} matmul) | MFU {figures['mfu']:.1%}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parsed = load_config(argv, description=__doc__, add_stage_args=add_profile_args)
    cfg, args = parsed.config, parsed.args
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    setup_backends(device)
    _, tokenizer, splits, _ = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    raw_model = LanguageModel(cfg, tokenizer.vocab_size).to(device)
    model = compile_model(raw_model, device) if cfg.torch_compile else raw_model
    optimizer = build_optimizer(raw_model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = autocast(device, dtype)

    def run_step(step: int) -> None:
        train_step(model, optimizer, scaler, splits["train"], cfg, step, device, ctx)
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup_steps):
        run_step(i)
    sec_per_step = timed_steps(run_step, args.steps, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(args.steps):
            with record_function(STEP):
                run_step(i)
    phases, kinds, top = breakdown(prof, on_gpu=device.type == "cuda")

    peak = measure_peak_flops(device, dtype)
    tok_s = cfg.tokens_per_step / sec_per_step
    figures = {
        "device": str(device), "dtype": str(dtype)[6:], "compile": cfg.torch_compile,
        "params": raw_model.num_params(), "tokens_per_step": cfg.tokens_per_step,
        "ms_per_step": sec_per_step * 1e3, "tokens_per_sec": tok_s,
        "model_tflops": raw_model.flops_per_token() * tok_s / 1e12, "peak_tflops": peak / 1e12,
        "mfu": raw_model.flops_per_token() * tok_s / peak,
        "phases": phases, "op_kinds": kinds,
    }
    out_dir = Path(args.out_dir) / datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    out_dir.mkdir(parents=True)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    report = format_report(phases, kinds, top, figures)
    (out_dir / "report.txt").write_text(report + "\n", encoding="utf-8")
    print(f"profile of {args.steps} steps ({raw_model.num_params() / 1e6:.2f}M parameters, batch "
          f"{cfg.batch_size} x {cfg.block_size}, {device}) -> {out_dir}")
    print(report)
    print(json.dumps({**figures, "out_dir": str(out_dir)}))
    return 0


if __name__ == "__main__":
    run_main(main)

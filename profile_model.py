"""Where does a training step spend its time, and how close is it to the machine's limit?

    python profile_model.py [--config debug] [--n-layer 6 ...] [--dtype bfloat16] [--no-generation]

1. Where the time goes: after warm-up steps, the very step train.py runs (training.train_step) under
   torch.profiler; the share of step time per phase (data, forward, backward, optimizer) and op kind
   (attention, linear/matmul, other), and the top ops by self time.
2. Throughput: ms/step and tokens/s of the bare step; MFU against the best of a few large square
   matmuls timed in this process, in the same dtype on the same device; and what train.py's own
   loop (Trainer.run; its logging, eval and checkpoints left out of the timing) adds over the step.
3. Generation: greedy tokens/s of generate() with the KV cache and with full recompute, from a short
   prompt past block_size. The outputs must be identical; if not, this exits 1 and says where.
The table and a Chrome trace (open it in https://ui.perfetto.dev) go to profiles/<timestamp>/; the
output ends with one JSON line of every figure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from config import add_config_arg, load_config
from data import prepare_corpus
from model import LanguageModel
from training.optim import build_optimizer, describe_optimizer
from training.step import compile_model, train_step
from training.trainer import Trainer
from utils.cli import run_main
from utils.device import autocast, matmul_flops, setup_compute, synchronize
from training.estimate import check_tokenizing_fits
from rundir.status import RunStatus
from utils.signals import NeverStop
from rundir.tracking import Tracker

STEP = "train_step"  # our own range around each step: the denominator of every share
PHASES = ("data", "forward", "backward", "optimizer")
# SDPA's calls, and the attention architectures/layers.py writes out on a CPU (dropout, short half-precision
# blocks): its forward runs under record_function("causal_attention"), and its backward is the only source
# of these nodes in gptlab's blocks (linear layers are mm/addmm; cross-entropy's softmax is LogSoftmax).
ATTENTION_MARKS = ("scaled_dot_product", "ScaledDotProduct", "flash_attention", "efficient_attention",
                   "causal_attention", ": BaddbmmBackward", ": BmmBackward", ": SoftmaxBackward")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
PEAK_SIZES = "2048,3072,4096"
MAX_SPREAD = 0.15  # repeats of a timing further apart than this mean a busy machine
MIN_ROUNDS = 3  # alternated timed rounds of the bare step and of the loop; the best of each counts
PROMPT_TOKENS = 8  # "a short prompt": generation then runs past block_size from almost nothing
GEN_KEYS = ("gen_tokens", "gen_prompt_tokens", "gen_identical", "gen_cached_tokens_per_sec",
            "gen_recompute_tokens_per_sec", "gen_speedup")


class GenerationMismatch(RuntimeError):
    """The KV-cached and the recomputed greedy outputs differ: a bug, never a speed."""


def add_profile_args(parser) -> None:
    """profile_model.py's own flags, in --a-b and --a_b forms like the config flags."""
    add_config_arg(parser)
    parser.add_argument("--warmup-steps", "--warmup_steps", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=5,
                        help="steps per timed round (of the bare step and of train.py's loop, alternated) and steps "
                             "profiled (default 5)")
    parser.add_argument("--min-seconds", "--min_seconds", type=float, default=10.0,
                        help=f"timed rounds go on, {MIN_ROUNDS} at least, until they add up to this (default 10)")
    parser.add_argument("--out-dir", "--out_dir", default="profiles", help="where <timestamp>/ goes (default profiles)")
    parser.add_argument("--peak-sizes", "--peak_sizes", default=PEAK_SIZES,
                        help=f"square matmul sizes whose best FLOP/s is the MFU peak (default {PEAK_SIZES})")
    parser.add_argument("--gen-tokens", "--gen_tokens", type=int, default=500,
                        help="new tokens per generation run (default 500)")
    parser.add_argument("--no-generation", "--no_generation", action="store_true",
                        help="skip the generation benchmark")


def check_args(args) -> list[int]:
    """ValueError for values no measurement can use; returns the peak sizes as ints."""
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1 (timed and profiled steps), got {args.steps}")
    if args.min_seconds < 0:
        raise ValueError(f"--min-seconds must be >= 0, got {args.min_seconds}")
    if args.warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.gen_tokens < 1:
        raise ValueError(f"--gen-tokens must be >= 1 (or pass --no-generation), got {args.gen_tokens}")
    try:
        sizes = [int(s) for s in args.peak_sizes.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--peak-sizes must be comma-separated positive integers such as {PEAK_SIZES}, "
                         f"got {args.peak_sizes!r}")
    return sizes


def measure_peak_flops(device: torch.device, dtype: torch.dtype, sizes: list[int], repeats: int = 2,
                       max_call_s: float = 2.0) -> tuple[float, int, str]:
    """(best FLOP/s, its size, its layout) of large square matmuls in this dtype on this device: the
    MFU denominator. Operands are of that dtype themselves, as autocast's matmuls are.

    Both layouts are tried because a CPU without native bf16 runs them at very different speeds
    (x @ W.T 25x faster on AVX2). A probe at 512 predicts each call's time; a size predicted past
    max_call_s is skipped (the smallest runs regardless), so a slow dtype costs seconds, not hours.
    """
    best = (0.0, sizes[0], "x @ W.T")
    for layout in ("x @ W.T", "x @ W"):
        rate = matmul_flops(512, layout, device, dtype, repeats=1)
        for n in sorted(sizes):
            if 2 * n**3 / rate > max_call_s and not (n == min(sizes) and best[0] == 0.0):
                continue
            flops = matmul_flops(n, layout, device, dtype, repeats)
            best = max(best, (flops, n, layout))
    return best


def op_kind(event) -> str:
    """attention if the op runs inside an attention call (forward or backward), else matmul or other."""
    e = event
    while e is not None:
        if any(mark in e.name for mark in ATTENTION_MARKS):
            return "attention"
        e = e.cpu_parent
    return "linear/matmul" if event.name in MATMUL_OPS else "other ops"


def breakdown(prof, on_gpu: bool) -> tuple[dict[str, float], dict[str, float], list[tuple[str, float]]]:
    """(phase shares, op-kind shares, top ops by self time in ms) from the profiler's event tree: on CPU
    of the ops' CPU time, on CUDA of their kernels' time (gpu_breakdown)."""
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    steps = [e for e in events if e.name == STEP]
    if on_gpu:
        return gpu_breakdown(events, steps)
    step_total = sum(e.cpu_time_total for e in steps)
    phases = {p: sum(e.cpu_time_total for e in events if e.name == p) / step_total for p in PHASES}
    phases["other"] = max(0.0, 1.0 - sum(phases.values()))
    kinds: dict[str, float] = {"attention": 0.0, "linear/matmul": 0.0, "other ops": 0.0}
    per_op: dict[str, float] = {}
    for e in events:
        if e.name == STEP or e.name in PHASES:
            continue
        kinds[op_kind(e)] += e.self_cpu_time_total / step_total
        per_op[e.name] = per_op.get(e.name, 0.0) + e.self_cpu_time_total
    top = sorted(((name, t / 1e3 / len(steps)) for name, t in per_op.items()), key=lambda kv: -kv[1])[:10]
    return phases, kinds, top


def gpu_breakdown(events: list, steps: list) -> tuple[dict[str, float], dict[str, float], list[tuple[str, float]]]:
    """On CUDA a phase's own range cannot be timed: its kernels run after the CPU has left it, and the
    backward's are launched by autograd's own thread, outside the range (it read 0%). So each op's
    kernels (its self device time) count for the phase whose CPU-side range the op started in, and
    shares are of all the step's kernel time."""
    def inside(e, ranges):
        return next((r for r in ranges if r.time_range.start <= e.time_range.start <= r.time_range.end), None)

    ranges = [e for e in events if e.name in PHASES]
    ops = [e for e in events if e.name != STEP and e.name not in PHASES and e.self_device_time_total > 0
           and inside(e, steps)]
    total = sum(e.self_device_time_total for e in ops) or 1.0
    phases = dict.fromkeys(PHASES, 0.0)
    kinds: dict[str, float] = {"attention": 0.0, "linear/matmul": 0.0, "other ops": 0.0}
    per_op: dict[str, float] = {}
    for e in ops:
        share = e.self_device_time_total / total
        if phase := inside(e, ranges):
            phases[phase.name] += share
        kinds[op_kind(e)] += share
        per_op[e.name] = per_op.get(e.name, 0.0) + e.self_device_time_total
    phases["other"] = max(0.0, 1.0 - sum(phases.values()))
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


class _LogClock(Tracker):
    """A tracker that notes when the training loop first logs: its last step is then done and
    synchronized (the log reads the losses), and the eval and checkpoint that follow are not begun."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.logged_at: float | None = None

    def log_scalars(self, step: int, scalars: dict[str, float], subset: str | None = None) -> None:
        if self.logged_at is None:
            synchronize(self.device)
            self.logged_at = time.perf_counter()


def loop_seconds_per_step(model, raw_model, optimizer, splits, tokenizer, cfg, device, dtype, n: int) -> float:
    """Seconds per step of train.py's real loop (Trainer.run) over n steps; logging and eval left out.

    The loop logs once, at its last step, where the clock stops; the eval (one batch per split, no
    sample) and the checkpoint it must write at its end come after that, into a temporary directory.
    Its console lines are swallowed.
    """
    loop_cfg = dataclasses.replace(cfg, max_iters=n, log_interval=n, eval_interval=n, eval_iters=1,
                                   sample_length=0, histogram_interval=0, checkpoint_interval=0,
                                   early_stopping_patience=0, keep_checkpoints=1, eval_at_start=False)
    clock = _LogClock(device)
    with tempfile.TemporaryDirectory(prefix="profile_loop_") as tmp, contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg=loop_cfg, raw_model=raw_model, model=model, optimizer=optimizer, splits=splits,
                          tokenizer=tokenizer, device=device, dtype=dtype, run_dir=Path(tmp), tracker=clock,
                          status=RunStatus(Path(tmp), enabled=False))
        synchronize(device)
        t0 = time.perf_counter()
        trainer.run(NeverStop())
    assert clock.logged_at is not None, "Trainer.run never logged: its log-at-the-last-step rule changed"
    return (clock.logged_at - t0) / n


def _timed_generate(model: LanguageModel, prompt: torch.Tensor, n_tokens: int, use_cache: bool,
                    device: torch.device) -> tuple[torch.Tensor, float]:
    synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(prompt, n_tokens, temperature=0.0, use_cache=use_cache)
    synchronize(device)
    return out, time.perf_counter() - t0


def measure_generation(model: LanguageModel, prompt: torch.Tensor, n_tokens: int, device: torch.device) -> dict:
    """Greedy tokens/s of generate() with the KV cache and with full recompute (as inference.py runs
    it: float32, no autocast); raises GenerationMismatch unless both outputs are identical.

    The cached run goes before and after the recompute and its two times are averaged, so a drift
    in the machine's speed weighs on both sides alike.
    """
    was_training = model.training
    model.eval()
    for use_cache in (True, False):
        model.generate(prompt, min(n_tokens, 4), temperature=0.0, use_cache=use_cache)  # warm-up
    cached, sec_before = _timed_generate(model, prompt, n_tokens, True, device)
    full, sec_full = _timed_generate(model, prompt, n_tokens, False, device)
    _, sec_after = _timed_generate(model, prompt, n_tokens, True, device)
    model.train(was_training)
    if not torch.equal(cached, full):
        diff = (cached != full).any(dim=0).nonzero()
        at = int(diff[0]) - prompt.size(1) if diff.numel() else -1
        raise GenerationMismatch(
            f"KV-cached generation differs from full recompute at new token {at} of {n_tokens} (greedy, "
            f"prompt of {prompt.size(1)} tokens, block_size {model.block_size}): the KV cache or the window "
            f"rule in model.py is broken; tests/test_model.py's cache tests should show where")
    sec_cached = (sec_before + sec_after) / 2
    return {
        "gen_tokens": n_tokens, "gen_prompt_tokens": prompt.size(1), "gen_identical": True,
        "gen_cached_tokens_per_sec": n_tokens / sec_cached, "gen_recompute_tokens_per_sec": n_tokens / sec_full,
        "gen_speedup": sec_full / sec_cached,
    }


def format_report(figures: dict, top: list[tuple[str, float]]) -> str:
    of = "kernel time (CUDA)" if figures["device"].startswith("cuda") else "step time"
    lines = [f"share of {of}", f"  {'phase':<16}{'share':>8}"]
    lines += [f"  {name:<16}{share:>8.1%}" for name, share in figures["phases"].items()]
    lines += [f"  {'op kind':<16}{'share':>8}"]
    lines += [f"  {name:<16}{share:>8.1%}" for name, share in figures["op_kinds"].items()]
    lines += ["top ops by self time (ms/step)"] + [f"  {name:<48}{ms:>9.2f}" for name, ms in top]
    f = figures
    lines += [f"step: {f['ms_per_step']:.1f} ms/step | {f['tokens_per_sec']:,.0f} tokens/s | "
              f"{f['model_tflops']:.3f} TFLOP/s model | peak {f['peak_tflops']:.3f} TFLOP/s "
              f"({f['dtype']} {f['peak_matmul_size']}^2 {f['peak_matmul_layout']}) | MFU {f['mfu']:.1%}",
              f"loop: {f['loop_ms_per_step']:.1f} ms/step | {f['loop_tokens_per_sec']:,.0f} tokens/s | "
              f"train.py's loop adds {f['loop_overhead']:.1%} over the bare step"]
    if f.get("gen_speedup") is not None:
        lines += [f"generation: {f['gen_tokens']} tokens greedy from {f['gen_prompt_tokens']} | KV cache "
                  f"{f['gen_cached_tokens_per_sec']:,.1f} tokens/s | recompute "
                  f"{f['gen_recompute_tokens_per_sec']:,.1f} tokens/s | {f['gen_speedup']:.1f}x | outputs identical"]
    return "\n".join(lines)


def build(cfg, device: torch.device, compiled: bool):
    """Data, the model (compiled if asked) and its optimizer, exactly as train.py builds them."""
    check_tokenizing_fits(cfg)
    corpus = prepare_corpus(cfg)
    tokenizer, splits = corpus.tokenizer, corpus.splits
    torch.manual_seed(cfg.seed)
    raw_model = LanguageModel(cfg, tokenizer.vocab_size).to(device)
    model = compile_model(raw_model, device) if compiled else raw_model
    return tokenizer, splits, raw_model, model, build_optimizer(raw_model, cfg, device)


def measure_training(cfg, args, tokenizer, splits, raw_model, model, optimizer, device, dtype,
                     after_round=lambda: None):
    """Warm-up; then rounds that time --steps bare steps and --steps steps of the real loop, alternated
    (so a slow spell on a shared machine hits both or neither), MIN_ROUNDS at least and until
    --min-seconds are timed, the best round of each counting; after_round runs after each round.
    Then --steps profiled steps. Returns (figures, profiler, top ops)."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ctx = autocast(device, dtype)

    def run_step(step: int) -> None:
        train_step(model, optimizer, splits["train"], step, cfg, scaler=scaler, ctx=ctx, device=device)
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup_steps):
        run_step(i)
    bare_rounds, loop_rounds = [], []
    while len(bare_rounds) < MIN_ROUNDS or sum(bare_rounds + loop_rounds) * args.steps < args.min_seconds:
        bare_rounds.append(timed_steps(run_step, args.steps, device))
        loop_rounds.append(loop_seconds_per_step(model, raw_model, optimizer, splits, tokenizer, cfg, device, dtype,
                                                 args.steps))
        after_round()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with without_usdt_lines(), profile(activities=activities) as prof:
        for i in range(args.steps):
            with record_function(STEP):
                run_step(i)
    phases, kinds, top = breakdown(prof, on_gpu=device.type == "cuda")
    sec, loop_sec = min(bare_rounds), min(loop_rounds)
    figures = {"ms_per_step": sec * 1e3, "tokens_per_sec": cfg.tokens_per_step / sec,
               "loop_ms_per_step": loop_sec * 1e3, "loop_tokens_per_sec": cfg.tokens_per_step / loop_sec,
               "loop_overhead": 1.0 - sec / loop_sec, "timed_rounds": len(bare_rounds), "phases": phases,
               "op_kinds": kinds, "spread": {"step": spread(bare_rounds), "loop": spread(loop_rounds)}}
    return figures, prof, top


def spread(times: list[float]) -> float:
    """How far repeats of one measurement disagree: slowest over fastest, minus 1."""
    return max(times) / min(times) - 1.0


def noise_warning(spreads: dict[str, float]) -> str:
    """A warning when repeats disagree by more than MAX_SPREAD: the machine was busy, and figures
    built from them (MFU, the loop's overhead) cannot be trusted."""
    noisy = {k: v for k, v in spreads.items() if v > MAX_SPREAD}
    if not noisy:
        return ""
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; " if hasattr(os, "getloadavg") else ""
    return (f"warning: repeated measurements disagree ({', '.join(f'{k} by {v:.0%}' for k, v in noisy.items())}; "
            f"{load}more than {MAX_SPREAD:.0%} is a busy machine): MFU and the loop's overhead are unreliable; "
            "measure again on a quiet machine")


@contextlib.contextmanager
def without_usdt_lines() -> Iterator[None]:
    """torch's profiler writes "USDT: ... profiler_start/stop" lines from C++ straight to file
    descriptor 2; they are held back, and anything else written there meanwhile is passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("USDT:"):
                    sys.stderr.write(line)


def generation_figures(raw_model: LanguageModel, splits: dict, args, device: torch.device) -> tuple[dict, str | None]:
    """(the gen_* figures, the mismatch message or None); all None under --no-generation."""
    figures = dict.fromkeys(GEN_KEYS)
    if args.no_generation:
        return figures, None
    ids = np.asarray(max(splits["val"], key=len)[:PROMPT_TOKENS], dtype=np.int64)
    prompt = torch.from_numpy(ids)[None].to(device)  # (1, PROMPT_TOKENS)
    try:
        return measure_generation(raw_model, prompt, args.gen_tokens, device), None
    except GenerationMismatch as e:
        return {**figures, "gen_identical": False}, str(e)


def main(argv: list[str] | None = None) -> int:
    parsed = load_config(argv, description=__doc__, add_stage_args=add_profile_args)
    cfg, args = parsed.config, parsed.args
    peak_sizes = check_args(args)
    compute = setup_compute(cfg.device, cfg.dtype, cfg.torch_compile)
    device, dtype, compiled = compute.device, compute.dtype, compute.compiled
    for note in [*parsed.notes, *compute.notes]:
        print(note, file=sys.stderr)
    tokenizer, splits, raw_model, model, optimizer = build(cfg, device, compiled)
    # The peak is sampled before, between the timed rounds and after: a shared machine's speed drifts,
    # and the steps are timed best-of too.
    peaks = [measure_peak_flops(device, dtype, peak_sizes)]
    n, layout = min(peak_sizes), peaks[0][2]  # the smallest size: a round may be short

    def sample_peak() -> None:
        peaks.append((matmul_flops(n, layout, device, dtype, repeats=1), n, layout))

    train_figs, prof, top = measure_training(cfg, args, tokenizer, splits, raw_model, model, optimizer, device,
                                             dtype, after_round=sample_peak)
    gen_figs, mismatch = generation_figures(raw_model, splits, args, device)
    peaks.append(measure_peak_flops(device, dtype, peak_sizes))
    peak, peak_n, peak_layout = max(peaks)
    sampled = [rate for rate, size, lay in peaks if (size, lay) == (n, layout)]
    train_figs["spread"]["peak"] = spread([1 / r for r in sampled]) if len(sampled) > 1 else 0.0

    flops_per_token = raw_model.flops_per_token()
    model_flops = flops_per_token * train_figs["tokens_per_sec"]
    figures = {
        "device": str(device), "dtype": str(dtype)[6:], "compile": compiled,
        "threads": torch.get_num_threads(), "params": raw_model.num_params(),
        "tokens_per_step": cfg.tokens_per_step, "flops_per_token": flops_per_token,
        "warmup_steps": args.warmup_steps, "steps": args.steps, **train_figs,
        "model_tflops": model_flops / 1e12, "peak_tflops": peak / 1e12, "peak_matmul_size": peak_n,
        "peak_matmul_layout": peak_layout, "mfu": model_flops / peak, **gen_figs,
    }
    out_dir = Path(args.out_dir) / datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    out_dir.mkdir(parents=True)
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    report = format_report(figures, top)
    (out_dir / "report.txt").write_text(report + "\n", encoding="utf-8")
    print(f"profile of {args.steps} steps ({raw_model.num_params() / 1e6:.2f}M parameters, batch "
          f"{cfg.batch_size} x {cfg.block_size}, {device}, {figures['dtype']}, {figures['threads']} threads) "
          f"-> {out_dir}")
    print(describe_optimizer(optimizer, cfg))
    print(report)
    if warning := noise_warning(figures["spread"]):
        print(warning, file=sys.stderr)
    print(json.dumps({**figures, "out_dir": str(out_dir)}))
    if mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)

"""Which ATen op makes CPU training differ between fresh processes with the same seed?

    python benchmarks/determinism_bisect.py [--runs 20] [--steps 10] [--dropout 0.1] [--threads N]
                                            [--env MKL_CBWR=COMPATIBLE] [--out DIR]

Each run is a new Python process that seeds torch, builds LanguageModel (2 layers, 32 wide, block 32,
batch 8) and trains --steps steps with train.py's train_step and AdamW (constant lr) on batches fixed by the seed,
recording every ATen op (forward, backward, optimizer) with a TorchDispatchMode: index, step, phase,
op name, output shapes and a hash of the output bytes. The runs are grouped by their final weights;
against the most common run, the first op whose output differs is printed with the ops before it,
and a histogram of each run's first-divergent op. Exit code 0: every run identical; 1: not; 2: a bad
argument or a failed run. Hashing every output adds work between ops, so a timing-dependent race
may show less often than in plain training; compare its rate with ../shared/tools/determinism_check.py.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import LanguageModel  # noqa: E402
from parameters import ModelConfig  # noqa: E402
from training.optim import build_optimizer  # noqa: E402
from training.step import train_step  # noqa: E402

VOCAB = 65
CONTEXT = 4  # ops shown before the first divergent one


def tensor_hash(t: torch.Tensor) -> str:
    """First 16 hex chars of sha256 over t's bytes; reads t, never writes it."""
    if t.layout != torch.strided or t.device.type == "meta":
        return "?"
    data = t.detach().reshape(-1).contiguous().view(torch.uint8)  # 0-dim, bool and int dtypes too
    return hashlib.sha256(data.cpu().numpy()).hexdigest()[:16]


class OpRecorder(TorchDispatchMode):
    """Writes one JSON line [index, step, phase, op, shapes, hash] per ATen op call."""

    def __init__(self, file, perturb_mm: int = 0) -> None:
        super().__init__()
        self.file, self.perturb_mm = file, perturb_mm
        self.n, self.mm_calls, self.step, self.phase = 0, 0, 0, "data"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "profiler":  # train_step's record_function markers compute nothing
            return out
        name = str(func)
        if name == "aten.mm.default":
            self.mm_calls += 1
            if self.mm_calls == self.perturb_mm:  # --selftest: a fake nondeterministic kernel
                out.add_(1e-7)
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # empty* outputs are uninitialised memory: their bytes differ between runs by design.
        digest = "-" if "empty" in func.__name__ else ",".join(tensor_hash(t) for t in tensors)
        node = torch._C._current_autograd_node()  # set while autograd runs a backward function
        phase = f"backward {node.name()}" if node is not None else self.phase
        row = [self.n, self.step, phase, name, [list(t.shape) for t in tensors], digest]
        self.file.write(json.dumps(row) + "\n")
        self.n += 1
        return out


def weights_hash(model: torch.nn.Module) -> str:
    return hashlib.sha256("".join(tensor_hash(t) for t in model.state_dict().values()).encode()).hexdigest()[:16]


def child(args: argparse.Namespace) -> None:
    """One run: train with every op recorded; the last line of the trace holds the weights' hash."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=args.dropout)
    tokens = np.random.default_rng(cfg.seed).integers(0, VOCAB, size=10_000)  # batches: get_batch(seed, step)
    torch.manual_seed(cfg.seed)
    model = LanguageModel(cfg, VOCAB)
    torch.manual_seed(cfg.seed)  # as train.py: init, then the dropout stream, from the seed
    device = torch.device("cpu")
    optimizer = build_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with open(args.child, "w") as f, OpRecorder(f, args.perturb_mm) as rec:
        model.register_forward_pre_hook(lambda *_: setattr(rec, "phase", "forward"))
        model.register_forward_hook(lambda *_: setattr(rec, "phase", "loss/clip"))
        optimizer.register_step_pre_hook(lambda *_: setattr(rec, "phase", "optimizer"))
        for step in range(args.steps):
            rec.step, rec.phase = step, "data"
            train_step(model, optimizer, tokens, step, cfg, scaler=scaler, ctx=contextlib.nullcontext(), device=device)
            optimizer.zero_grad(set_to_none=True)
    with open(args.child, "a") as f:
        f.write(json.dumps({"weights": weights_hash(model), "threads": torch.get_num_threads(),
                            "capability": torch.backends.cpu.get_cpu_capability()}) + "\n")


def run_children(args: argparse.Namespace, out_dir: Path) -> list[tuple[dict, list[list]]]:
    """Fresh processes one after another (in parallel they would contend for the cores)."""
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    runs = []
    for i in range(args.runs):
        path = out_dir / f"run{i:03d}.jsonl"
        cmd = [sys.executable, __file__, "--child", str(path), "--steps", str(args.steps),
               "--dropout", str(args.dropout)] + (["--threads", str(args.threads)] if args.threads else [])
        if args.selftest and i == 2:
            cmd += ["--perturb-mm", "5"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
            raise RuntimeError(f"run {i} failed: {lines[-1]}")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        runs.append((rows[-1], rows[:-1]))
        print(f"run {i:3d}: weights {rows[-1]['weights']}, {len(rows) - 1} ops, {time.perf_counter() - t0:.1f} s")
    return runs


def first_divergence(ref: list[list], trace: list[list]) -> int | None:
    """Index of the first op whose name, shapes or output hash differ (or where one trace ends)."""
    for i, (a, b) in enumerate(zip(ref, trace)):
        if a[3:] != b[3:]:
            return i
    return None if len(ref) == len(trace) else min(len(ref), len(trace))


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def fmt(i: int, step: int, phase: str, name: str, shapes: list, digest: str) -> str:
    return f"#{i:<6d} step {step} {phase:<28s} {name:<40s} {str(shapes):<24s} {digest}"


def report(runs: list[tuple[dict, list[list]]]) -> int:
    meta = runs[0][0]
    print(f"machine: {cpu_model()} | cpu capability {meta['capability']} | torch threads {meta['threads']}")
    groups = collections.Counter(m["weights"] for m, _ in runs)
    ref_i = next(i for i, (m, _) in enumerate(runs) if m["weights"] == groups.most_common(1)[0][0])
    ref = runs[ref_i][1]
    diverged = {i: d for i, (_, t) in enumerate(runs) if (d := first_divergence(ref, t)) is not None}
    if len(groups) == 1 and not diverged:
        print(f"deterministic: {len(runs)} runs, {len(ref)} ops each, identical")
        return 0
    print(f"NOT deterministic: {len(groups)} distinct final weights in {len(runs)} runs: "
          + ", ".join(f"{n} x {h}" for h, n in groups.most_common()))
    if not diverged:
        print("every trace matches the reference: the difference arises outside the recorded ops")
        return 1
    first = min(diverged.values())
    at_first = [i for i, d in diverged.items() if d == first]
    print(f"first divergent op: #{first} in {len(at_first)} of {len(runs)} runs (reference: run {ref_i})")
    for row in ref[max(0, first - CONTEXT):first + 1]:
        print("  " + fmt(*row))
    for i in at_first:
        if first < len(runs[i][1]):
            print(f"  run {i:<3d} " + fmt(*runs[i][1][first]))
    print("first-divergent op per diverging run:")
    names = collections.Counter(ref[d][3] if d < len(ref) else "(trace length)" for d in diverged.values())
    for name, n in names.most_common():
        print(f"  {n:4d}  {name}")
    return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.error = lambda msg: (print(f"error: {msg}", file=sys.stderr), sys.exit(2))  # one line, no usage block
    ap.add_argument("--runs", type=int, default=20, help="fresh processes (default 20)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per run (default 10)")
    ap.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS and torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="keep the traces in this directory (default: a temp dir)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in the children; repeatable")
    ap.add_argument("--selftest", action="store_true", help=argparse.SUPPRESS)  # run 2 perturbs its 5th aten.mm
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--perturb-mm", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.runs < (3 if args.selftest else 2):
        ap.error(f"--runs must be >= {3 if args.selftest else 2} to compare runs, got {args.runs}")
    if args.steps < 1 or (args.threads is not None and args.threads < 1) or not 0.0 <= args.dropout < 1.0:
        ap.error("--steps and --threads must be >= 1 and --dropout in [0, 1)")
    if bad := [kv for kv in args.env if "=" not in kv or kv.startswith("=")]:
        ap.error(f"--env takes KEY=VALUE, got {bad[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="determinism_") as tmp:
        (out_dir := args.out or Path(tmp)).mkdir(parents=True, exist_ok=True)
        try:
            return report(run_children(args, out_dir))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())

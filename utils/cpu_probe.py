"""Half precision on this CPU: does it run at all, and is it faster than float32? A child process answers.

    result = probe_half_precision("bfloat16")   # HalfPrecision(usable, isa_cap, speedup, problem, ...)
    if result.isa_cap: os.environ["ONEDNN_MAX_CPU_ISA"] = result.isa_cap   # before the first bf16 op

Some CPUs advertise instructions they cannot execute: an Intel Sapphire Rapids VM lists AMX, and
oneDNN's bf16 matmul then dies with SIGILL, taking the process (and a test suite) down without a word.
So the first half-precision work never runs in the caller. A child process runs what training runs
under autocast (a Linear forward and backward, causal attention) and times square matmuls in both
layouts against float32. If the child is killed by a signal, it runs again with oneDNN capped at
older instruction sets (ONEDNN_MAX_CPU_ISA; the issue's VM ran with AVX512_CORE_BF16); the first cap
that survives is the one to use. The answer is cached per CPU (model and flags), torch version and
existing cap, in ~/.cache/gptlab/ (GPTLAB_CACHE_DIR overrides), so it costs one child per machine.

GPTLAB_CPU_PROBE=faster|slower|crashes|unusable replaces the measurement with the answer one kind of
CPU gives (FORCED below), so that on any machine the suite, or a run, takes the path another CPU
takes: `GPTLAB_CPU_PROBE=faster make test` runs the suite as an AVX-512 BF16 machine (Zen 5) would.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from utils.files import atomic_write_json, read_json_object

# Caps tried in order after a crash: the newest ISA without AMX first, AVX2 (no AVX-512 at all) last.
ISA_CAPS = {"bfloat16": ("AVX512_CORE_BF16", "AVX2"), "float16": ("AVX10_1_512", "AVX512_CORE_BF16", "AVX2")}
ISA_ORDER = ("AVX2", "AVX512_CORE_BF16", "AVX10_1_512")  # oldest first: the lowest of two caps satisfies both
TIMEOUT_S = 300
MATMUL_N = 512
FORCE_VAR = "GPTLAB_CPU_PROBE"

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F

dtype, n = getattr(torch, sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
linear = torch.nn.Linear(64, 192)
x = torch.randn(4, 16, 64, requires_grad=True)
with torch.autocast("cpu", dtype=dtype):  # what a training step runs in this dtype
    q, k, v = (t.view(4, 16, 4, 16).transpose(1, 2) for t in linear(x).split(64, dim=-1))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
y.float().sum().backward()


def seconds(dt, transposed):  # best of 3 (n, n) matmuls in nn.Linear's layout or the plain one
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    w = b.t() if transposed else b
    a @ w
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ w
        best = min(best, time.perf_counter() - t0)
    return best


fp32 = seconds(torch.float32, True) + seconds(torch.float32, False)
half = seconds(dtype, True) + seconds(dtype, False)
print(json.dumps({"speedup": fp32 / half}))
"""


@dataclass(frozen=True)
class HalfPrecision:
    dtype: str
    usable: bool
    isa_cap: str | None      # ONEDNN_MAX_CPU_ISA without which it crashed; None: runs as it is
    speedup: float | None    # float32 matmul time / this dtype's (both layouts); < 1 means slower
    problem: str             # why it is unusable, or what crashed before the cap; "" when nothing did
    forced: str = ""         # the GPTLAB_CPU_PROBE value that decided this answer; "" when measured

    @property
    def basis(self) -> str:
        """How the speedup is known, for the notes that quote it."""
        return f"as {FORCE_VAR}={self.forced} says" if self.forced else "measured on this CPU"


# The answers of the CPUs seen so far, each forced by GPTLAB_CPU_PROBE=<name> (speedups: bf16's as measured).
FORCED = {
    "faster": lambda dtype: HalfPrecision(dtype, True, None, 4.37, ""),  # AMD Zen 5: AVX-512 BF16
    "slower": lambda dtype: HalfPrecision(dtype, True, None, 0.15, ""),  # AMD Zen 3: AVX2 emulates bf16
    # An Intel Sapphire Rapids VM: AMX advertised but not executable; runs (and gains) under the first cap.
    "crashes": lambda dtype: HalfPrecision(dtype, True, ISA_CAPS[dtype][0], 2.0, "killed by SIGILL (an instruction "
                                           "the CPU advertises but cannot execute, e.g. AMX in a VM)"),
    "unusable": lambda dtype: HalfPrecision(dtype, False, None, None, "killed by SIGILL, even with "
                                            f"ONEDNN_MAX_CPU_ISA={ISA_CAPS[dtype][-1]}"),
}


def forced_answer(dtype: str) -> HalfPrecision | None:
    """The answer GPTLAB_CPU_PROBE forces, or None when it is unset (the probe then measures)."""
    name = os.environ.get(FORCE_VAR, "")
    if not name:
        return None
    if name not in FORCED:
        raise ValueError(f"{FORCE_VAR}={name!r} is not one of {', '.join(FORCED)}; unset it to measure this CPU")
    return replace(FORCED[name](dtype), forced=name)


def half_precision_cap() -> str | None:
    """The one ONEDNN_MAX_CPU_ISA under which both bf16 and fp16 run here (None: no cap needed). For a
    process, such as a test session, that may run either before it knows which."""
    caps = {probe_half_precision(dtype).isa_cap for dtype in ISA_CAPS} - {None}
    return min(caps, key=ISA_ORDER.index) if caps else None


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab"
    return Path(os.environ.get("GPTLAB_CACHE_DIR") or default)


def machine_key() -> str:
    """What the answer depends on: the CPU (model and flags), torch, and a cap the user already set."""
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "|".join(dict.fromkeys(l for l in lines if l.startswith(("model name", "flags"))))
    except OSError:
        pass
    facts = [cpu, platform.machine(), torch.__version__, os.environ.get("ONEDNN_MAX_CPU_ISA", "")]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:16]


def run_child(dtype: str, env_cap: str | None, code: str = CHILD) -> tuple[float | None, str]:
    """(speedup, "") if the child ran the workload, else (None, why not)."""
    env = {**os.environ, **({"ONEDNN_MAX_CPU_ISA": env_cap} if env_cap else {})}
    try:
        res = subprocess.run([sys.executable, "-c", code, dtype, str(MATMUL_N)], capture_output=True, text=True,
                             env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"the probe did not finish in {TIMEOUT_S} s"
    if res.returncode < 0:
        name = signal.Signals(-res.returncode).name
        what = " (an instruction the CPU advertises but cannot execute, e.g. AMX in a VM)" if name == "SIGILL" else ""
        return None, f"killed by {name}{what}"
    if res.returncode:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        return None, f"failed: {last[:300]}"
    return float(json.loads(res.stdout.strip().splitlines()[-1])["speedup"]), ""


def measure(dtype: str, code: str = CHILD) -> HalfPrecision:
    """Run the child as the environment is; after a crash, under each cap in turn."""
    speedup, problem = run_child(dtype, None, code)
    if speedup is not None:
        return HalfPrecision(dtype, True, None, speedup, "")
    if not problem.startswith("killed by"):  # an error, not a crash: no cap will change it
        return HalfPrecision(dtype, False, None, None, problem)
    for cap in ISA_CAPS[dtype]:
        speedup, _ = run_child(dtype, cap, code)
        if speedup is not None:
            return HalfPrecision(dtype, True, cap, speedup, problem)
    return HalfPrecision(dtype, False, None, None, f"{problem}, even with ONEDNN_MAX_CPU_ISA={ISA_CAPS[dtype][-1]}")


def probe_half_precision(dtype: str, code: str = CHILD) -> HalfPrecision:
    """The cached answer for this machine, measured on first use (or the one GPTLAB_CPU_PROBE forces,
    never cached). A cache that cannot be read or written is ignored: the probe is then simply run again."""
    if forced := forced_answer(dtype):
        return forced
    path = cache_dir() / f"half_precision_{machine_key()}.json"
    cached = read_json_object(path)
    try:
        return HalfPrecision(**cached[dtype])
    except (KeyError, TypeError):  # not probed yet, or an entry of another shape
        pass
    result = measure(dtype, code)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**cached, dtype: asdict(result)})
    except OSError:
        pass
    return result

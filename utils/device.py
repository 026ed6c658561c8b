"""Device, dtype and autocast setup, written once for every stage (nanoGPT copies it three times).

    compute = setup_compute(cfg.device, cfg.dtype, cfg.torch_compile)   # Compute(device, dtype, compiled, notes)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import ContextManager

import torch

from utils.cpu_probe import HalfPrecision, probe_half_precision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dtype auto picks bfloat16 on a CPU only where its matmuls measured at least this much faster than
# float32's: a margin, so that timing noise cannot flip a machine between the two from run to run.
CPU_BF16_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class Compute:
    """Where and how a stage computes; notes are lines for the stage to print."""
    device: torch.device
    dtype: torch.dtype
    compiled: bool
    notes: tuple[str, ...] = ()


def setup_compute(device: str, dtype: str, torch_compile: str) -> Compute:
    """Resolve the device, the dtype (probing half precision on CPU first) and compile, and set the
    backend flags: every stage calls this once, before any model exists."""
    dev, notes = resolve_device(device), []
    dt = resolve_dtype(dtype, dev, notes)
    compiled = resolve_compile(torch_compile, dev)
    setup_backends(dev)
    return Compute(dev, dt, compiled, tuple(notes))


def resolve_device(name: str) -> torch.device:
    """auto picks CUDA, then MPS, then CPU; asking for a device that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    if name.startswith("cuda:") and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ValueError(f"device '{name}' does not exist: {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but Apple MPS is not available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, notes: list[str]) -> torch.dtype:
    """auto: bfloat16 on CUDA cards that support it (Ampere and later); on a CPU only where the probe
    measured bf16 matmuls faster than float32; else float32. A CPU dtype that crashes even under a safe
    ISA cap is a user error naming --dtype float32. What the choice needed saying goes to notes."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu":
            probe = probe_half_precision("bfloat16")
            if probe.usable and probe.speedup >= CPU_BF16_MIN_SPEEDUP:
                chose = f"dtype auto: bfloat16, whose matmuls run {probe.speedup:.2f}x float32's ({probe.basis})"
                notes.append("; ".join(n for n in (chose, _apply_cap(probe)) if n))
                return torch.bfloat16
        return torch.float32
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype bfloat16 is not supported on this GPU; use --dtype float32 or float16")
    if device.type == "cpu" and name != "float32":
        if note := cpu_half_precision_note(name):
            notes.append(note)
    return DTYPES[name]


def cpu_half_precision_note(name: str) -> str:
    """Probe bf16/fp16 on this CPU (in a child process, cached) and apply any ISA cap it needs."""
    probe = probe_half_precision(name)
    if not probe.usable:
        raise ValueError(f"dtype {name} cannot run on this CPU: a {name} matmul probe was {probe.problem}; "
                         "use --dtype float32")
    notes = [_apply_cap(probe)]
    if probe.speedup < 1.0:
        notes.append(f"warning: {name} matmuls run at {probe.speedup:.2f}x float32's speed ({probe.basis}; "
                     f"{torch.backends.cpu.get_cpu_capability()}), so {name} autocast will be slower; "
                     "use --dtype float32")
    return "; ".join(n for n in notes if n)


def _apply_cap(probe: HalfPrecision) -> str:
    """Set the oneDNN ISA cap the probe needed, before this process runs its first half-precision op
    (oneDNN reads it once, at its first use)."""
    if not probe.isa_cap:
        return ""
    os.environ["ONEDNN_MAX_CPU_ISA"] = probe.isa_cap
    return (f"{probe.dtype} on this CPU: oneDNN capped at ONEDNN_MAX_CPU_ISA={probe.isa_cap}, because "
            f"uncapped the probe was {probe.problem}" + (f" ({probe.basis})" if probe.forced else ""))


def resolve_compile(setting: str, device: torch.device) -> bool:
    """Whether to torch.compile. auto: on CUDA only. On CPU, inductor measured 1.00-1.14x faster per
    step in float32; in bf16 autocast 1.09x for profile_model.py's bare step but none in train.py's loop
    (shakespeare_char, Zen 4). It needs 24-32 s to compile on a cold cache (and a C++ compiler), more than
    the default recipe can earn back (README, Performance); on MPS only aot_eager exists, which does not fuse."""
    if setting == "auto":
        return device.type == "cuda"
    if setting == "true" and device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                                           or shutil.which("clang++")):
        raise ValueError("torch_compile on CPU needs a C++ compiler (inductor builds C++ kernels): install "
                         "g++ or clang++ (or set CXX), or use --torch-compile false")
    return setting == "true"


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed precision for the forward pass; weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_backends(device: torch.device) -> None:
    """TF32 matmuls on CUDA: a free speed-up for float32 work on Ampere and later."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings measure the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_flops(n: int, layout: str, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul over `repeats` timed calls after one warm-up call.
    layout "x @ W.T" is nn.Linear's (the forward's matmuls); "x @ W" the plain one (some of backward's)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    w = b.t() if layout == "x @ W.T" else b
    a @ w  # warm-up: kernel selection, allocation, packing buffers
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ w
        synchronize(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best

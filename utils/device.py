"""Device, dtype and autocast setup, written once for every stage (nanoGPT copies it three times)."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import ContextManager

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA cards that support it (Ampere and later), float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype bfloat16 is not supported on this GPU; use --dtype float16 or float32")
    return DTYPES[name]


def resolve_compile(setting: str, device: torch.device) -> bool:
    """Whether to torch.compile. auto: on CUDA only. On CPU, inductor measured 1.00-1.14x faster per
    step and needs 26-28 s to compile on a cold cache (and a C++ compiler), more than the default
    recipe can earn back (README, Performance); on MPS only aot_eager exists, which does not fuse."""
    if setting == "auto":
        return device.type == "cuda"
    if setting == "true" and device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                                           or shutil.which("clang++")):
        raise ValueError("torch_compile on CPU needs a C++ compiler (inductor builds C++ kernels): install "
                         "g++ or clang++ (or set CXX), or use --torch-compile false")
    return setting == "true"


def dtype_note(dtype: torch.dtype, device: torch.device) -> str:
    """A warning where a half-precision dtype will be slower than float32: CPUs without native bf16
    (no AVX512-BF16 or AMX; on a Zen 3 EPYC, bf16 autocast trained at 0.034x float32's speed)."""
    if device.type != "cpu" or dtype == torch.float32:
        return ""
    native = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]()
    if native:
        return ""
    return (f"warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {str(dtype)[6:]} "
            f"matmuls, so {str(dtype)[6:]} autocast runs far slower than float32; use --dtype float32")


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

"""utils/device.py: what auto means for device, dtype and compile, and the errors for absent hardware."""

from __future__ import annotations

import pytest
import torch

from utils.device import dtype_note, resolve_compile, resolve_device, resolve_dtype

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", CPU, False), ("auto", MPS, False), ("auto", CUDA, True),  # measured: README, Performance
    ("true", CPU, True), ("false", CUDA, False),
])
def test_compile_auto_is_on_only_where_it_measured_faster(setting, device, expected):
    assert resolve_compile(setting, device) is expected


def test_dtype_auto_on_cpu_is_float32_and_explicit_dtypes_are_kept():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16 and resolve_dtype("float16", CPU) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for an absent GPU")
def test_absent_cuda_is_a_user_error_that_names_the_fix():
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu or auto"):
        resolve_device("cuda")


def test_auto_device_without_a_gpu_is_cpu():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert resolve_device("auto") == CPU


def test_compile_on_cpu_without_a_cxx_compiler_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ or clang++ to be found
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="needs a C.. compiler .* or use --torch-compile false"):
        resolve_compile("true", CPU)
    assert resolve_compile("auto", CPU) is False  # auto never asks for one on CPU


def test_half_precision_on_a_cpu_without_native_bf16_warns():
    note = dtype_note(torch.bfloat16, CPU)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert note == ""  # this CPU has AVX512-BF16 or AMX: bf16 can pay off
    else:
        assert "no native bfloat16 matmuls" in note and "--dtype float32" in note
    assert dtype_note(torch.float32, CPU) == "" and dtype_note(torch.bfloat16, CUDA) == ""

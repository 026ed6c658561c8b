"""utils/device.py and utils/cpu_probe.py: what auto means for device, dtype and compile, the errors for
absent hardware, and half precision on CPU probed in a child so that a crash cannot take us down."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from utils import cpu_probe, device as device_mod
from utils.cpu_probe import HalfPrecision, measure, probe_half_precision
from utils.device import resolve_compile, resolve_device, resolve_dtype

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", CPU, False), ("auto", MPS, False), ("auto", CUDA, True),  # measured: README, Performance
    ("true", CPU, True), ("false", CUDA, False),
])
def test_compile_auto_is_on_only_where_it_measured_faster(setting, device, expected):
    assert resolve_compile(setting, device) is expected


def dtype_and_note(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """resolve_dtype's choice, and what it said about it (its notes, joined)."""
    notes: list[str] = []
    return resolve_dtype(name, device, notes), "; ".join(notes)


def fake_probe(monkeypatch, **fields) -> None:
    result = HalfPrecision(**{"dtype": "bfloat16", "usable": True, "isa_cap": None, "speedup": 0.5, "problem": "",
                              **fields})
    monkeypatch.setattr(device_mod, "probe_half_precision", lambda name: dataclasses.replace(result, dtype=name))


def test_dtype_auto_on_cpu_is_bfloat16_only_where_it_measured_faster(monkeypatch):
    fake_probe(monkeypatch, speedup=0.5)
    assert dtype_and_note("auto", CPU) == (torch.float32, "")
    fake_probe(monkeypatch, speedup=1.1)  # within the margin: not worth a change of numerics
    assert dtype_and_note("auto", CPU) == (torch.float32, "")
    fake_probe(monkeypatch, speedup=2.5)
    dtype, note = dtype_and_note("auto", CPU)
    assert dtype == torch.bfloat16 and "2.50x float32" in note


def test_explicit_cpu_half_precision_is_kept_with_a_warning_when_slower(monkeypatch):
    fake_probe(monkeypatch, speedup=0.12)
    dtype, note = dtype_and_note("bfloat16", CPU)
    assert dtype == torch.bfloat16 and "0.12x float32" in note and "--dtype float32" in note
    fake_probe(monkeypatch, speedup=1.9)
    assert dtype_and_note("float16", CPU) == (torch.float16, "")
    assert dtype_and_note("float32", CPU) == (torch.float32, "")


def test_a_crash_the_cap_avoids_sets_the_cap_and_says_so(monkeypatch, isa_cap_restored):
    fake_probe(monkeypatch, isa_cap="AVX512_CORE_BF16", speedup=0.5, problem="killed by SIGILL")
    dtype, note = dtype_and_note("bfloat16", CPU)
    assert dtype == torch.bfloat16 and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    assert "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" in note and "SIGILL" in note and "0.50x" in note


def test_a_dtype_that_cannot_run_is_a_user_error(monkeypatch):
    fake_probe(monkeypatch, usable=False, speedup=None, problem="killed by SIGILL, even with ONEDNN_MAX_CPU_ISA=AVX2")
    with pytest.raises(ValueError, match="dtype bfloat16 cannot run on this CPU: .*SIGILL.*; use --dtype float32"):
        dtype_and_note("bfloat16", CPU)
    assert dtype_and_note("auto", CPU) == (torch.float32, "")  # auto never picks what cannot run


# Stand-ins for the probe's child: plain Python, so they cost milliseconds. Each appends a line to
# the file named by PROBE_LOG, to count the children started.
CHILD_HEAD = "import os, signal, sys\nopen(os.environ['PROBE_LOG'], 'a').write(os.environ.get('ONEDNN_MAX_CPU_ISA', '-') + '\\n')\n"
CRASH_UNLESS_AVX2 = CHILD_HEAD + ("if os.environ.get('ONEDNN_MAX_CPU_ISA') != 'AVX2': os.kill(os.getpid(), signal.SIGILL)\n"
                                  "print('{\"speedup\": 0.75}')")
ALWAYS_CRASH = CHILD_HEAD + "os.kill(os.getpid(), signal.SIGILL)"
RAISES = CHILD_HEAD + "raise RuntimeError('addmm not implemented for BFloat16')"


@pytest.fixture
def probe_env(monkeypatch, tmp_path, isa_cap_restored):
    monkeypatch.delenv("GPTLAB_CPU_PROBE", raising=False)  # these tests measure
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PROBE_LOG", str(tmp_path / "children.log"))
    return tmp_path / "children.log"


def test_the_probe_tries_caps_in_order_until_one_survives(probe_env):
    result = measure("bfloat16", CRASH_UNLESS_AVX2)
    assert result == HalfPrecision("bfloat16", True, "AVX2", 0.75, result.problem)
    assert result.problem.startswith("killed by SIGILL")
    assert probe_env.read_text().split() == ["-", "AVX512_CORE_BF16", "AVX2"]


def test_the_probe_reports_a_crash_no_cap_avoids_and_an_error_without_retrying(probe_env):
    crashed = measure("float16", ALWAYS_CRASH)
    assert not crashed.usable and "SIGILL" in crashed.problem and "even with ONEDNN_MAX_CPU_ISA=AVX2" in crashed.problem
    probe_env.unlink()
    failed = measure("bfloat16", RAISES)
    assert not failed.usable and failed.problem == "failed: RuntimeError: addmm not implemented for BFloat16"
    assert probe_env.read_text().split() == ["-"]  # an error is not a crash: no cap would change it


def test_the_answer_is_cached_per_machine_and_a_bad_cache_is_measured_again(probe_env, tmp_path, monkeypatch):
    first = probe_half_precision("bfloat16", CRASH_UNLESS_AVX2)
    assert probe_half_precision("bfloat16", CRASH_UNLESS_AVX2) == first
    assert len(probe_env.read_text().split()) == 3  # the second answer came from the cache
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_text("{not json")
    assert probe_half_precision("bfloat16", CRASH_UNLESS_AVX2) == first
    assert len(probe_env.read_text().split()) == 6
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another environment is another machine
    assert cpu_probe.machine_key() != cache.name.split("_")[-1].removesuffix(".json")


def test_the_real_probe_answers_without_taking_this_process_down(probe_env):
    """Whatever this CPU does with bf16 (crash, slow, fast), the answer comes back as data."""
    result = measure("bfloat16")
    assert result.usable == (result.speedup is not None)
    if result.usable:
        assert result.speedup > 0
    else:
        assert result.problem


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


def test_one_cap_serves_both_half_precision_dtypes(monkeypatch):
    caps = {"bfloat16": "AVX512_CORE_BF16", "float16": None}
    monkeypatch.setattr(cpu_probe, "probe_half_precision",
                        lambda d: HalfPrecision(d, True, caps[d], 1.0, ""))
    assert cpu_probe.half_precision_cap() == "AVX512_CORE_BF16"
    caps["float16"] = "AVX2"
    assert cpu_probe.half_precision_cap() == "AVX2"
    caps.update(bfloat16=None, float16=None)
    assert cpu_probe.half_precision_cap() is None


@pytest.mark.parametrize("cpu, auto, cap", [("faster", torch.bfloat16, None), ("slower", torch.float32, None),
                                            ("crashes", torch.bfloat16, "AVX512_CORE_BF16"),
                                            ("unusable", torch.float32, None)])
def test_gptlab_cpu_probe_forces_each_kind_of_cpu_and_is_never_cached(cpu, auto, cap, monkeypatch, tmp_path,
                                                                        isa_cap_restored):
    monkeypatch.setenv("GPTLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTLAB_CPU_PROBE", cpu)
    answer = probe_half_precision("bfloat16")
    assert answer.forced == cpu and answer.isa_cap == cap and answer.usable == (cpu != "unusable")
    dtype, note = dtype_and_note("auto", CPU)
    assert dtype == auto and os.environ.get("ONEDNN_MAX_CPU_ISA") == cap
    if auto == torch.bfloat16:
        assert f"(as GPTLAB_CPU_PROBE={cpu} says)" in note
    if cpu == "unusable":
        with pytest.raises(ValueError, match="dtype float16 cannot run on this CPU: .*SIGILL.*; use --dtype float32"):
            dtype_and_note("float16", CPU)
    assert not (tmp_path / "cache").exists()  # a forced answer is not this machine's


def test_an_unknown_gptlab_cpu_probe_is_one_line(monkeypatch):
    monkeypatch.setenv("GPTLAB_CPU_PROBE", "fast")
    with pytest.raises(ValueError, match="^GPTLAB_CPU_PROBE='fast' is not one of faster, slower, crashes, unusable; "
                                         "unset it to measure this CPU$"):
        dtype_and_note("auto", CPU)

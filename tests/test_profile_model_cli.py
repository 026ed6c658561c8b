"""profile_model.py: the report, the trace, the JSON figures, flag errors, and the generation check."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import profile_model
from conftest import call_main, run_cli
from utils.device import resolve_dtype
from profile_model import (GEN_KEYS, GenerationMismatch, check_args, generation_figures, measure_generation,
                           measure_peak_flops)

FIGURE_KEYS = (
    "device", "dtype", "compile", "threads", "params", "tokens_per_step", "flops_per_token", "warmup_steps",
    "steps", "ms_per_step", "tokens_per_sec", "loop_ms_per_step", "loop_tokens_per_sec", "loop_overhead",
    "timed_rounds",
    "model_tflops", "peak_tflops", "peak_matmul_size", "peak_matmul_layout", "mfu", "phases", "op_kinds",
    *GEN_KEYS, "out_dir",
)


def test_profile_debug_preset(tmp_path: Path, tiny_corpus: Path):
    res = call_main(profile_model.main, "--config", "debug", "--data", str(tiny_corpus), "--device", "cpu",
                    "--data-dir", str(tmp_path / "data"), "--steps", "2", "--warmup-steps", "1", "--gen-tokens", "40",
                    "--peak-sizes", "256", "--min-seconds", "0", "--out-dir", str(tmp_path / "profiles"))
    assert res.returncode == 0, res.stderr
    figures = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(FIGURE_KEYS) <= set(figures)
    auto = str(resolve_dtype("auto", torch.device("cpu"), [])).removeprefix("torch.")  # what this CPU gets
    assert figures["device"] == "cpu" and figures["dtype"] == auto and figures["steps"] == 2
    assert figures["tokens_per_step"] == 8 * 32 and figures["flops_per_token"] > 0
    for key in ("ms_per_step", "tokens_per_sec", "loop_ms_per_step", "loop_tokens_per_sec", "peak_tflops",
                "gen_cached_tokens_per_sec", "gen_recompute_tokens_per_sec", "gen_speedup"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert 0 < figures["mfu"] < 1.5 and figures["loop_overhead"] < 1
    assert figures["gen_identical"] is True and figures["gen_tokens"] == 40 and figures["timed_rounds"] == 3
    assert sum(figures["phases"].values()) == pytest.approx(1.0, abs=1e-6)
    assert figures["phases"]["forward"] > 0 and figures["phases"]["backward"] > 0
    assert figures["op_kinds"]["linear/matmul"] > 0 and figures["op_kinds"]["attention"] > 0
    out = Path(figures["out_dir"])
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    assert "share of step time" in (out / "report.txt").read_text()
    for word in ("forward", "backward", "optimizer", "attention", "linear/matmul", "MFU", "loop", "KV cache"):
        assert word in res.stdout
    assert "optimizer adamw, cosine schedule: AdamW lr" in res.stdout  # the groups, as train.py prints them


def test_bad_steps_is_one_line_exit_2(tmp_path: Path):
    """The CLI contract, once through a real process."""
    res = run_cli("profile_model.py", "--config", "debug", "--steps", "0", "--out-dir", str(tmp_path / "profiles"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: --steps must be >= 1 (timed and profiled steps), got 0"]
    assert not (tmp_path / "profiles").exists()


@pytest.mark.parametrize("flags, message", [
    (dict(steps=-2), "--steps must be >= 1"), (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
    (dict(gen_tokens=0), "--gen-tokens must be >= 1"), (dict(peak_sizes="2048,x"), "--peak-sizes must be"),
    (dict(min_seconds=-1.0), "--min-seconds must be >= 0"),
])
def test_bad_flag_values_are_value_errors(flags: dict, message: str):
    args = argparse.Namespace(**{**dict(steps=5, warmup_steps=3, gen_tokens=500, peak_sizes="2048", min_seconds=10.0), **flags})
    with pytest.raises(ValueError, match=message):
        check_args(args)


class _TwoMindedModel:
    """Stands in for LanguageModel: its cached and recomputed outputs differ at one position."""
    block_size, training = 16, False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, idx, max_new_tokens, temperature=1.0, use_cache=True):
        out = torch.cat([idx, torch.zeros(1, max_new_tokens, dtype=torch.long)], dim=1)
        if use_cache and max_new_tokens > 5:
            out[0, idx.size(1) + 5] = 1
        return out


def test_generation_mismatch_is_an_error_that_says_where():
    with pytest.raises(GenerationMismatch, match="differs from full recompute at new token 5 of 20"):
        measure_generation(_TwoMindedModel(), torch.zeros(1, 3, dtype=torch.long), 20, torch.device("cpu"))


def test_no_generation_leaves_the_figures_empty():
    figures, mismatch = generation_figures(None, {}, argparse.Namespace(no_generation=True), torch.device("cpu"))
    assert figures == dict.fromkeys(GEN_KEYS) and mismatch is None


def test_peak_skips_sizes_too_slow_to_time():
    flops, n, layout = measure_peak_flops(torch.device("cpu"), torch.float32, [64, 50_000])
    assert flops > 0 and n == 64 and layout in ("x @ W.T", "x @ W")


def test_the_profilers_usdt_lines_are_hidden_and_the_rest_of_stderr_kept(capfd):
    """torch's profiler writes `USDT: ... profiler_start/stop` from C++ to descriptor 2."""
    import os
    with profile_model.without_usdt_lines():
        os.write(2, b"USDT:2026-11-24 07:05:09 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"a warning worth seeing\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "a warning worth seeing" in err


def test_repeats_that_disagree_are_flagged_as_a_busy_machine():
    assert profile_model.noise_warning({"step": 0.04, "loop": 0.10, "peak": 0.02}) == ""
    warning = profile_model.noise_warning({"step": 0.48, "loop": 2.10, "peak": 0.02})
    assert warning.startswith("warning: repeated measurements disagree (step by 48%, loop by 210%")
    assert "unreliable" in warning and "peak" not in warning.split(";")[0]
    assert profile_model.spread([1.0, 1.2, 1.1]) == pytest.approx(0.2)

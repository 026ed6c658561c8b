"""utils/estimate.py: memory and time before a run starts; what cannot fit is refused before it allocates."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

import train
from model import LanguageModel
from parameters import ModelConfig
from training.estimate import (Estimate, activation_bytes, check_fits, count_params, describe, estimate_run,
                               flops_per_token, state_bytes)

CPU = torch.device("cpu")


@pytest.mark.parametrize("changes", [{}, {"bias": False}, {"n_layer": 3, "n_embd": 48, "n_head": 3, "block_size": 40},
                                     {"arch": "llama", "n_kv_head": 1, "tie_embeddings": False}])
def test_parameter_and_flop_counts_equal_the_model(tiny_cfg: ModelConfig, changes: dict):
    cfg = dataclasses.replace(tiny_cfg, **changes)
    model = LanguageModel(cfg, 77)
    assert count_params(cfg, 77) == model.num_params()
    assert flops_per_token(cfg, 77) == model.flops_per_token()


def saved_for_backward(cfg: ModelConfig, vocab: int) -> int:
    """Bytes of the tensors autograd keeps from one forward (parameters excluded)."""
    torch.manual_seed(0)
    model = LanguageModel(cfg, vocab).train()
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_the_activation_model_covers_what_autograd_saves(dropout: float):
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=64, batch_size=6, dropout=dropout)
    saved = saved_for_backward(cfg, 300)
    estimated = activation_bytes(cfg, 300, CPU, torch.float32)
    logits = cfg.batch_size * cfg.block_size * 300 * 4
    # The estimate adds two transient copies of the logits to what is saved; the rest agrees within 10%.
    assert abs((estimated - 2 * logits) - saved) < 0.1 * saved, (estimated, saved)


@pytest.mark.parametrize("T", [64, 256])
def test_the_activation_model_covers_bf16_with_the_written_out_attention(T: int):
    """bf16 autocast on a CPU trains short blocks through the written-out attention, which keeps its
    probabilities (2 bytes each, measured against SDPA's path): the estimate counts them, and the whole
    is within 20% of what autograd saves (17% and 8% under at these two shapes)."""
    from utils.cpu_probe import probe_half_precision

    if not probe_half_precision("bfloat16").usable:
        pytest.skip(f"bfloat16 cannot run on this CPU: {probe_half_precision('bfloat16').problem}")
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=64, block_size=T, batch_size=6, dropout=0.0)
    with torch.autocast("cpu", torch.bfloat16):
        saved = saved_for_backward(cfg, 300)
    estimated = activation_bytes(cfg, 300, CPU, torch.bfloat16) - 2 * cfg.batch_size * T * 300 * 4
    assert abs(estimated - saved) < 0.2 * saved, (estimated, saved)


def test_a_run_that_cannot_fit_is_refused_at_once(tiny_cfg: ModelConfig):
    t0 = time.perf_counter()
    est = estimate_run(dataclasses.replace(tiny_cfg, n_layer=1_000_000), 65, CPU, torch.float32)
    with pytest.raises(ValueError, match=r"this run needs about [\d,.]+ GB .* but cpu has .* lower n_layer"):
        check_fits(est, CPU)
    assert time.perf_counter() - t0 < 5  # arithmetic and one small matmul, not an allocation
    check_fits(estimate_run(tiny_cfg, 65, CPU, torch.float32), CPU)


def test_the_train_stage_refuses_before_creating_a_run(tiny_corpus: Path, tmp_path: Path):
    argv = ["--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"), "--data-dir",
            str(tmp_path / "data"), "--device", "cpu", "--dtype", "float32", "--batch-size", "100000000"]
    with pytest.raises(ValueError, match="activations per micro-batch"):
        train.main(argv)
    assert not (tmp_path / "runs").exists()


def fake(**fields) -> Estimate:
    base = dict(params=10**6, state_bytes=16 * 10**6, activation_bytes=10**8, device_bytes=10**10,
                available_bytes=10**10, step_seconds=0.05, total_seconds=100.0, steps=2000, evals=9, rate=1e11)
    return Estimate(**{**base, **fields})


def test_the_description_warns_of_hours_and_of_too_little_free_memory():
    (line,) = describe(fake(), CPU)
    assert line.startswith("estimate: memory ~0.1 GB of 10.0 GB available | ~50 ms/step, ~1m40s for 2,000 steps")
    lines = describe(fake(total_seconds=30 * 3600.0, available_bytes=5 * 10**7), CPU)
    assert any("more than the 50 MB free now" in line for line in lines)
    assert any("hours on this cpu" in line and "--config debug" in line for line in lines)


def test_fsdp_divides_the_state_over_the_ranks_and_adds_what_it_gathers(tiny_cfg: ModelConfig):
    """Each rank: 16 bytes per parameter over the ranks, plus the root and three blocks whole in float32;
    the root and the blocks counted on the model itself."""
    cfg = dataclasses.replace(tiny_cfg, n_layer=8, parallelism="fsdp")
    model = LanguageModel(cfg, 65)
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    root = model.num_params() - cfg.n_layer * block
    whole = estimate_run(cfg, 65, CPU, torch.float32, world_size=1)
    assert whole.state_bytes == 16 * model.num_params() and whole.shards == 1  # one process: nothing to shard
    for world in (2, 4):
        per_rank = state_bytes(cfg, 65, world)
        assert per_rank == (16 * model.num_params() // world + 4 * (root + 3 * block), world)
    ddp = dataclasses.replace(cfg, parallelism="ddp")
    assert state_bytes(ddp, 65, 4) == (16 * model.num_params(), 1)


def test_a_run_that_fits_only_when_sharded_says_so():
    big = fake(params=2 * 10**9, state_bytes=32 * 10**9, activation_bytes=10**9, device_bytes=24 * 10**9)
    with pytest.raises(ValueError, match="on every rank under ddp.*--parallelism fsdp"):
        check_fits(big, torch.device("cuda"))
    sharded = fake(params=2 * 10**9, state_bytes=32 * 10**9 // 8, activation_bytes=10**9, device_bytes=24 * 10**9,
                   shards=8)
    check_fits(sharded, torch.device("cuda"))
    (line,) = describe(sharded, torch.device("cuda"))
    assert "per rank (fsdp over 8)" in line

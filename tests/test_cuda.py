"""CUDA paths: bf16 autocast, torch.compile (inductor), flash SDPA, pinned batches, NCCL DDP, and fsdp on NCCL
(bf16 MixedPrecisionPolicy, compiled blocks, DCP checkpoints of CUDA shards).

Skipped without a GPU (the CI machine has none); run them on a CUDA machine with `make test`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import REPO, TINY_TEXT, run_cli
from model import LanguageModel
from parameters import ModelConfig
from utils.device import autocast, resolve_dtype
from rundir.export import load_export

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_dtype_auto_is_bf16_on_ampere_and_later():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), []) == expected


def test_flash_attention_runs_for_the_models_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=128)
    model = LanguageModel(cfg, 100).cuda()
    x = torch.randint(0, 100, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(torch.device("cuda"), torch.bfloat16):
        logits, _ = model(x)  # raises if the flash kernel cannot take these shapes/dtypes
    with autocast(torch.device("cuda"), torch.bfloat16):
        reference, _ = model(x)
    # torch may pick another kernel (cuDNN's, on an H200): bf16 logits one rounding step apart (3e-3 measured)
    torch.testing.assert_close(logits, reference, atol=1e-2, rtol=2e-2)


def test_compiled_bf16_training_on_cuda_exports_for_cpu(tiny_corpus: Path, tmp_path: Path):
    res = run_cli("train.py", "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                  "--data-dir", str(tmp_path / "data"), "--device", "cuda", "--dtype", "auto", "--torch-compile")
    assert res.returncode == 0, res.stderr
    assert "bfloat16" in res.stdout or not torch.cuda.is_bf16_supported()
    (run_dir,) = (tmp_path / "runs").iterdir()
    model, tok, _ = load_export(run_dir, "cpu")  # a compiled CUDA run loads into a plain CPU model
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_two_ranks(tiny_corpus: Path, tmp_path: Path):
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
         "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
         "--data-dir", str(tmp_path / "data"), "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "GPTLAB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr


# fsdp on CUDA (NCCL). One GPU holds one rank: NCCL refuses two ranks on one device, so these shard over a
# one-rank NCCL group in this process. That still runs every CUDA piece of the fsdp path: FSDP2's NCCL
# all-gathers and reduce-scatters, the bf16 MixedPrecisionPolicy, per-block compile, fused AdamW and
# Muon's bf16 Newton-Schulz on DTensors, DCP's save and load of CUDA shards, and the gather to a CPU copy.

def _fsdp_cfg(optimizer: str) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=8, dropout=0.0,
                       optimizer=optimizer, learning_rate=3e-3, muon_lr=0.02, warmup_iters=0, max_iters=100)


@pytest.fixture(scope="module")
def nccl_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _pair(optimizer: str, dtype: torch.dtype, compiled: bool, checkpointing: bool = False):
    """A plain CUDA model and an fsdp copy of it (one NCCL rank; with checkpointing, every block of it
    recomputes its activations), each with its optimizer, laid out in train.py's order."""
    from training.optim import build_optimizer
    from training.parallelize import apply_activation_checkpointing, apply_fsdp
    from utils.device import Compute
    from utils.distributed import Dist
    cfg = _fsdp_cfg(optimizer)
    torch.manual_seed(0)
    plain = LanguageModel(cfg, 65).cuda()
    sharded = LanguageModel(cfg, 65).cuda()
    sharded.load_state_dict(plain.state_dict())
    if checkpointing:
        assert apply_activation_checkpointing(sharded, dataclasses.replace(cfg, activation_checkpointing="full"))
    apply_fsdp(sharded, Compute(torch.device("cuda"), dtype, compiled), Dist())
    return cfg, (plain, build_optimizer(plain, cfg, torch.device("cuda"))), \
        (sharded, build_optimizer(sharded, cfg, torch.device("cuda")))


def _steps(model, optimizer, cfg, n: int, ctx, first: int = 0) -> list[float]:
    from training.step import train_step
    from utils.distributed import Dist
    tokens = (np.frombuffer(TINY_TEXT.encode(), dtype=np.uint8) % 65).astype(np.uint16)  # learnable text
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    losses = []
    for step in range(first, first + n):
        loss, _ = train_step(model, optimizer, tokens, step, cfg, scaler=scaler, ctx=ctx, device=torch.device("cuda"),
                             d=Dist())
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_float32_on_nccl_equals_the_plain_model(nccl_group, optimizer: str):
    from rundir.sharded import holds_shards
    from training.parallelize import full_copy
    cfg, (plain, plain_opt), (sharded, sharded_opt) = _pair(optimizer, torch.float32, compiled=False)
    assert holds_shards(sharded) and not holds_shards(plain)
    expected = _steps(plain, plain_opt, cfg, 10, contextlib.nullcontext())
    got = _steps(sharded, sharded_opt, cfg, 10, contextlib.nullcontext())
    assert got == pytest.approx(expected, abs=1e-4)
    whole = full_copy(sharded, cfg).state_dict()
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(whole[name], t.cpu(), atol=1e-4, rtol=0, msg=name)


def test_fsdp_bf16_policy_compiled_blocks_and_sharded_checkpoint(nccl_group, tmp_path: Path):
    from rundir.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, verify
    from rundir.sharded import read_shard_weights
    from torch.distributed.tensor import DTensor
    from training.parallelize import full_copy, gathered
    cfg, (plain, plain_opt), (sharded, sharded_opt) = _pair("adamw", torch.bfloat16, compiled=True, checkpointing=True)
    seen = []
    sharded.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    expected = _steps(plain, plain_opt, cfg, 8, autocast(torch.device("cuda"), torch.bfloat16))
    got = _steps(sharded, sharded_opt, cfg, 8, contextlib.nullcontext())  # the policy alone makes it bf16
    assert seen and set(seen) == {torch.bfloat16}  # blocks compute in bf16 ...
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in sharded.parameters())  # ... on fp32 shards
    # autocast keeps norms and the loss in float32, the policy runs them in bf16: close, not equal
    assert got == pytest.approx(expected, rel=0.03)
    assert got[-1] < got[0] - 0.3
    with gathered(sharded):  # whole weights for a sample, no collective per forward
        out = sharded.generate(torch.zeros((1, 1), dtype=torch.long, device="cuda"), 20)
    assert out.shape == (1, 21)

    scaler = torch.amp.GradScaler("cuda", enabled=False)
    path = save_checkpoint(tmp_path / "checkpoints", sharded, sharded_opt, scaler, {"iteration": 8})
    meta = verify(path)
    assert meta["format"] == "sharded"
    whole = full_copy(sharded, cfg).state_dict()
    stored = read_shard_weights(path)
    assert stored.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(stored[name], t), name
    # a fresh sharded model and optimizer resumed from it continue exactly as the original does
    _, _, (again, again_opt) = _pair("adamw", torch.bfloat16, compiled=True, checkpointing=True)
    load_checkpoint(Checkpoint(path, meta), again, again_opt, scaler, torch.device("cuda"))
    go_on = _steps(sharded, sharded_opt, cfg, 3, contextlib.nullcontext(), first=8)
    resumed = _steps(again, again_opt, cfg, 3, contextlib.nullcontext(), first=8)
    assert resumed == go_on
    # and the same checkpoint loads whole into a plain CUDA model
    fresh = LanguageModel(cfg, 65).cuda()
    load_checkpoint(Checkpoint(path, meta), fresh, None, None, torch.device("cuda"))
    for name, t in fresh.state_dict().items():
        assert torch.equal(t.cpu(), stored[name]), name


def test_fsdp_run_on_one_gpu_trains_as_one_process(tiny_corpus: Path, tmp_path: Path):
    res = run_cli("train.py", "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / "runs"),
                  "--data-dir", str(tmp_path / "data"), "--device", "cuda", "--parallelism", "fsdp",
                  "--activation-checkpointing", "full", "--max-iters", "20")
    assert res.returncode == 0, res.stderr
    assert "nothing to shard" in res.stdout

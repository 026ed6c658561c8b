"""CUDA paths: bf16 autocast, torch.compile (inductor), flash SDPA, pinned batches, NCCL DDP.

Skipped without a GPU (the CI machine has none); run them on a CUDA machine with `make test`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
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
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=128)
    model = LanguageModel(cfg, 100).cuda()
    x = torch.randint(0, 100, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(torch.device("cuda"), torch.bfloat16):
        logits, _ = model(x)  # raises if the flash kernel cannot take these shapes/dtypes
    with autocast(torch.device("cuda"), torch.bfloat16):
        reference, _ = model(x)
    torch.testing.assert_close(logits, reference)


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

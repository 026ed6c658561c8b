"""Checkpoints: exact state round trip, hash verification with fallback, rotation, SIGKILL mid-write."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from model import LanguageModel
from training import build_optimizer
from utils.checkpoint import (best_checkpoint, find_checkpoints, latest_good, load_checkpoint, mark_best, rotate,
                              save_checkpoint, verify)


def make(cfg, seed=0):
    torch.manual_seed(seed)
    model = LanguageModel(cfg, 30)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    model(torch.randint(0, 30, (2, 8)), torch.randint(0, 30, (2, 8)))[1].backward()
    opt.step()
    return model, opt, torch.amp.GradScaler("cpu", enabled=False)


def test_round_trip_restores_weights_optimizer_and_every_rng(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 7, "note": "x"})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    model2, opt2, scaler2 = make(tiny_cfg, seed=1)
    (ckpt, skipped) = latest_good(tmp_path)
    assert ckpt.path == path and ckpt.iteration == 7 and ckpt.meta["note"] == "x" and not skipped
    load_checkpoint(ckpt, model2, opt2, scaler2, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert model2.lm_head.weight.data_ptr() == model2.transformer.wte.weight.data_ptr()


def test_damaged_checkpoint_is_refused_and_resume_falls_back(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    first = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})
    second = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 2})
    data = bytearray((second / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (second / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded SHA-256"):
        verify(second)
    ckpt, skipped = latest_good(tmp_path)
    assert ckpt.path == first and len(skipped) == 1 and "step_000002" in skipped[0]


def test_rotation_keeps_newest_and_best(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    paths = [save_checkpoint(tmp_path, model, opt, scaler, {"iteration": i}) for i in range(1, 7)]
    mark_best(tmp_path, paths[1], 1.5)
    (tmp_path / ".tmp_step_000009_999999").mkdir()  # leftover of a killed writer
    rotate(tmp_path, keep=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_000002", "step_000005", "step_000006"]
    assert best_checkpoint(tmp_path) == paths[1] and not list(tmp_path.glob(".tmp_*"))


WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from parameters import ModelConfig
from model import LanguageModel
from training import build_optimizer
from pathlib import Path
from utils.checkpoint import rotate, save_checkpoint
cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64)
model = LanguageModel(cfg, 1000)
opt = build_optimizer(model, cfg, torch.device("cpu"))
model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
opt.step()
i = 0
while True:
    i += 1
    if i == 2:
        print("ready", flush=True)  # one checkpoint is complete; the kill lands in a later write
    save_checkpoint(Path({out!r}), model, opt, torch.amp.GradScaler("cpu", enabled=False), {{"iteration": i}})
    rotate(Path({out!r}), keep=2)
"""


@pytest.mark.slow
def test_sigkill_mid_write_never_leaves_a_checkpoint_that_fails_to_load(tmp_path: Path):
    rng = random.Random(0)
    out = tmp_path / "ckpts"
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), out=str(out))],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        listed = find_checkpoints(out)
        assert listed
        for path in listed:
            verify(path)  # every visible checkpoint is whole
        ckpt, skipped = latest_good(out)
        assert ckpt is not None and not skipped

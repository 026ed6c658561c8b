"""Checkpoints: exact state round trip, hash verification with fallback, rotation, SIGKILL mid-write."""

from __future__ import annotations

import errno
import json
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
from training.optim import build_optimizer
from rundir.checkpoint import (_digest, best_checkpoint, find_checkpoints, latest_good, load_checkpoint,
                              mark_best, rotate, save_checkpoint, verify)
from utils.files import sha256_file


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
    skipped: list[str] = []
    ckpt = latest_good(tmp_path, skipped)
    assert ckpt.path == path and ckpt.iteration == 7 and ckpt.meta["note"] == "x" and not skipped
    load_checkpoint(ckpt, model2, opt2, scaler2, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    assert model2.lm_head.weight.data_ptr() == model2.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("poison", ["weight", "optimizer"])
def test_non_finite_weights_or_optimizer_state_are_never_checkpointed(tiny_cfg, tmp_path: Path, poison: str):
    model, opt, scaler = make(tiny_cfg)
    good = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})
    with torch.no_grad():
        if poison == "weight":
            model.transformer.h[1].mlp.c_fc.weight[3, 4] = float("nan")
        else:
            next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = float("inf")
    name = "transformer.h.1.mlp.c_fc.weight" if poison == "weight" else "optimizer state 0.exp_avg_sq"
    with pytest.raises(ValueError, match=f"checkpoint step_000002 not written: {name} holds non-finite values"):
        save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 2})
    assert find_checkpoints(tmp_path) == [good] and latest_good(tmp_path).path == good
    assert not list(tmp_path.glob(".tmp_*"))


def test_damaged_checkpoint_is_refused_and_resume_falls_back(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    first = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})
    second = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 2})
    data = bytearray((second / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (second / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded SHA-256"):
        verify(second)
    skipped = []
    ckpt = latest_good(tmp_path, skipped)
    assert ckpt.path == first and len(skipped) == 1 and "step_000002" in skipped[0]


def edit_meta(path: Path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(change(meta)))


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "iteration": 45}, "does not match its recorded digest"),  # resumed "at iteration 45" before
    (lambda m: {k: v for k, v in m.items() if k != "sha256"}, "does not match its recorded digest"),
    (lambda m: {k: v for k, v in m.items() if k not in ("sha256", "meta_sha256")}, "no meta_sha256"),
    (lambda m: [], "not a checkpoint record"),
    (lambda m: {**m, "config": {**m.get("config", {}), "n_layer": 3}}, "does not match its recorded digest"),
])
def test_an_edited_meta_json_is_refused_and_resume_falls_back(change, message, tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    first = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1, "config": tiny_cfg.to_dict()})
    second = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 2, "config": tiny_cfg.to_dict()})
    edit_meta(second, change)
    with pytest.raises(ValueError, match=message):
        verify(second)
    skipped = []
    ckpt = latest_good(tmp_path, skipped)
    assert ckpt.path == first and len(skipped) == 1


def test_a_checkpoint_must_describe_its_own_directory(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    path = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 4})
    path.rename(tmp_path / "step_000009")
    with pytest.raises(ValueError, match="does not describe step_000009"):
        verify(tmp_path / "step_000009")


def test_a_trainer_pt_that_is_not_plain_data_is_refused_without_advising_pickle(tiny_cfg, tmp_path: Path):
    """Even with its hash recomputed, a trainer.pt holding a pickled object never loads."""
    model, opt, scaler = make(tiny_cfg)
    path = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})
    torch.save({"optimizer": opt.state_dict(), "payload": Path("/")}, path / "trainer.pt")  # an arbitrary object
    meta = json.loads((path / "meta.json").read_text())
    del meta["meta_sha256"]
    meta["sha256"]["trainer.pt"] = sha256_file(path / "trainer.pt")
    meta["meta_sha256"] = _digest(meta)
    (path / "meta.json").write_text(json.dumps(meta))
    ckpt = latest_good(tmp_path)
    with pytest.raises(ValueError) as error:
        load_checkpoint(ckpt, model, opt, scaler, torch.device("cpu"))
    assert "holds something other than tensors and plain data" in str(error.value)
    assert "weights_only=False" not in str(error.value) and "\n" not in str(error.value)


def test_a_full_disk_removes_the_partial_checkpoint_and_says_how_much_room(tiny_cfg, tmp_path: Path, monkeypatch):
    model, opt, scaler = make(tiny_cfg)
    good = save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ValueError, match=r"^disk full at .*: a checkpoint needs about [\d,]+ MB and [\d,]+ MB are "
                                         r"free; the last good checkpoint is kept"):
        save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 2})
    assert find_checkpoints(tmp_path) == [good] and not list(tmp_path.glob(".tmp_*"))


def test_rotation_keeps_the_temp_directory_of_a_live_writer(tiny_cfg, tmp_path: Path):
    """Two processes in one run used to sweep each other's in-progress saves (the run lock now stops that;
    rotate() also leaves a temp directory whose writer is alive)."""
    model, opt, scaler = make(tiny_cfg)
    save_checkpoint(tmp_path, model, opt, scaler, {"iteration": 1})
    live = tmp_path / f".tmp_step_000002_{os.getppid()}"  # our parent: alive for as long as this test
    dead = tmp_path / ".tmp_step_000003_999999999"
    live.mkdir(), dead.mkdir()
    rotate(tmp_path, keep=2)
    assert live.is_dir() and not dead.exists()


def test_rotation_keeps_newest_and_best(tiny_cfg, tmp_path: Path):
    model, opt, scaler = make(tiny_cfg)
    paths = [save_checkpoint(tmp_path, model, opt, scaler, {"iteration": i}) for i in range(1, 7)]
    mark_best(tmp_path, paths[1], 1.5)
    (tmp_path / ".tmp_step_000009_999999").mkdir()  # leftover of a killed writer
    rotate(tmp_path, keep=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_000002", "step_000005", "step_000006"]
    assert best_checkpoint(tmp_path) == paths[1] and not list(tmp_path.glob(".tmp_*"))


WRITER = """
import os, sys, time, torch
sys.path.insert(0, {repo!r})
from parameters import ModelConfig
from model import LanguageModel
from training.optim import build_optimizer
from pathlib import Path
from rundir.checkpoint import rotate, save_checkpoint
cfg = ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64)
model = LanguageModel(cfg, 1000)
opt = build_optimizer(model, cfg, torch.device("cpu"))
model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
opt.step()
while not os.path.exists(sys.argv[1]):  # the writers start together; each writes when its turn comes
    time.sleep(0.01)
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
    """Three writers in turn into one directory, each killed mid-write: the next sweeps what it left."""
    rng = random.Random(0)
    out = tmp_path / "ckpts"
    code = WRITER.format(repo=str(REPO), out=str(out))
    turns = [tmp_path / f"turn{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(turn)], stdout=subprocess.PIPE, text=True)
             for turn in turns]  # their start-up (seconds of imports) overlaps; their writing does not
    for turn, proc in zip(turns, procs):
        turn.touch()
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 1.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        listed = find_checkpoints(out)
        assert listed
        for path in listed:
            verify(path)  # every visible checkpoint is whole
        skipped = []
        ckpt = latest_good(out, skipped)
        assert ckpt is not None and not skipped

"""Activation checkpointing: the same gradients as the plain model, exactly (dropout included), far
fewer bytes kept for backward, an estimate that knows it, and a run that trains to the same weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import call_main
from model import LanguageModel
from rundir.export import load_export
from training.estimate import activation_bytes
from training.parallelize import apply_activation_checkpointing, checkpointed_blocks


def grads_and_saved_bytes(cfg, mode: str, every: int = 2) -> tuple[dict[str, torch.Tensor], int]:
    """Every parameter's gradient after one forward and backward, and the bytes autograd saved for it."""
    cfg = dataclasses.replace(cfg, activation_checkpointing=mode, activation_checkpoint_every=every)
    torch.manual_seed(0)
    model = LanguageModel(cfg, 50).train()
    assert apply_activation_checkpointing(model, cfg) == checkpointed_blocks(cfg)
    x = torch.randint(0, 50, (4, cfg.block_size), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t
    torch.manual_seed(2)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, sum(saved)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_checkpointed_blocks_give_the_same_gradients_and_keep_far_less(tiny_cfg, arch: str):
    cfg = dataclasses.replace(tiny_cfg, arch=arch, n_layer=4, dropout=0.1, block_size=32)
    plain, plain_bytes = grads_and_saved_bytes(cfg, "none")
    for mode, every in [("full", 1), ("selective", 2), ("selective", 3)]:
        grads, kept = grads_and_saved_bytes(cfg, mode, every)
        for name, g in plain.items():
            assert torch.equal(grads[name], g), (mode, every, name)
        assert kept < plain_bytes
        if mode == "full":  # each block keeps its input alone: what is left is mostly the logits' share
            assert kept < 0.45 * plain_bytes, (kept, plain_bytes)
    assert checkpointed_blocks(dataclasses.replace(cfg, activation_checkpointing="selective",
                                                   activation_checkpoint_every=3)) == [0, 3]


def test_the_estimate_counts_what_checkpointing_keeps(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, n_layer=8, n_embd=64, block_size=64, batch_size=8)
    sizes = [activation_bytes(dataclasses.replace(cfg, activation_checkpointing=m), 100, torch.device("cpu"),
                              torch.float32) for m in ("none", "selective", "full")]
    assert sizes[0] > sizes[1] > sizes[2]


def test_a_checkpointed_run_trains_to_the_same_weights(tiny_corpus: Path, tmp_path: Path):
    import train

    weights = []
    for mode in ("none", "full"):
        res = call_main(train.main, "--config", "debug", "--data", str(tiny_corpus), "--runs-dir", str(tmp_path / mode),
                        "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--dtype", "float32",
                        "--dropout", "0.1", "--max-iters", "6", "--activation-checkpointing", mode)
        assert res.returncode == 0, res.stderr
        (run,) = (tmp_path / mode).iterdir()
        weights.append(load_export(run).model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

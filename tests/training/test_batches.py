"""training/batches.py: the batch of step k is a pure function of (seed, step, rank), on one array or across shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.batches import get_batch
from corpus.text import split_tokens, tokenize_cached
from tokenizer import CharTokenizer


def test_get_batch_shape_shift_and_purity() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)  # token value = its offset, so each row shows where it starts
    kw = dict(seed=7, step=3, split="train", rank=0, world_size=2)
    x, y = get_batch(tokens, 12, 64, **kw)
    assert x.shape == y.shape == (12, 64) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = row_x[0]
        assert np.array_equal(row_x, tokens[start:start + 64]) and np.array_equal(row_y, tokens[start + 1:start + 65])
    x2, y2 = get_batch(tokens, 12, 64, **kw)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for change in ({"step": 4}, {"split": "val"}, {"rank": 1}, {"seed": 8}):
        assert not torch.equal(x, get_batch(tokens, 12, 64, **{**kw, **change})[0]), change



def test_get_batch_covers_the_last_token_and_stays_in_range() -> None:
    tokens = np.arange(20, dtype=np.uint16)
    seen = set()
    for step in range(200):
        x, y = get_batch(tokens, 4, 16, seed=0, step=step)
        assert torch.equal(y, x + 1)  # arange: the target is the next token
        seen.update(y[:, -1].tolist())
    assert seen == {16, 17, 18, 19}  # every start in [0, len - block_size - 1] gets drawn



def test_get_batch_errors() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        get_batch(np.arange(100), 2, 8, seed=0, step=0, split="test")
    with pytest.raises(ValueError, match="fewer than block_size"):
        get_batch(np.arange(8), 2, 8, seed=0, step=0)



def test_get_batch_from_memmap(tiny_text: str, tmp_path: Path) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    tokens = tokenize_cached(tiny_text, tok, tmp_path).ids
    x, y = get_batch(split_tokens(tokens, 0.1, 16)["val"], 4, 16, seed=1, step=0, split="val")
    assert x.shape == (4, 16) and isinstance(x, torch.Tensor) and tok.decode(x[0]) in tiny_text



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_get_batch_cuda_matches_cpu() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 4, 16, seed=0, step=0, device="cuda")
    assert x.is_cuda and torch.equal(x.cpu(), get_batch(tokens, 4, 16, seed=0, step=0)[0])



def test_global_batch_is_sliced_by_micro_step_and_rank() -> None:
    """batch 2B in one piece == two micro-steps of B == two ranks of B: the same sequences."""
    tokens = np.arange(5000) % 251
    whole, _ = get_batch(tokens, 8, 16, seed=3, step=5)
    micro = torch.cat([get_batch(tokens, 4, 16, seed=3, step=5, micro=m, n_micro=2)[0] for m in range(2)])
    ranks = torch.cat([get_batch(tokens, 4, 16, seed=3, step=5, rank=r, world_size=2)[0] for r in range(2)])
    mixed = torch.cat([get_batch(tokens, 2, 16, seed=3, step=5, micro=m, n_micro=2, rank=r, world_size=2)[0]
                       for r in range(2) for m in range(2)])
    assert torch.equal(whole, micro) and torch.equal(whole, ranks) and torch.equal(whole, mixed)



def test_get_batch_on_one_array_is_the_reference_draw() -> None:
    """One array: the draw is rng.integers(0, len - block) and a gather, as it always was."""
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(tokens, 8, 16, seed=3, step=5)
    starts = np.random.default_rng([3, 5, 0]).integers(0, 1000 - 16, size=8)
    assert torch.equal(x, torch.from_numpy(tokens[starts[:, None] + np.arange(16)].astype(np.int64)))
    assert torch.equal(y, x + 1)
    assert torch.equal(get_batch([tokens], 8, 16, seed=3, step=5)[0], x)



def test_get_batch_across_shards_stays_inside_one_and_slices_like_one_process() -> None:
    arrays = [np.arange(k * 10_000, k * 10_000 + n, dtype=np.uint32) for k, n in enumerate([50, 3000, 10, 700])]
    x, y = get_batch(arrays, 64, 16, seed=1, step=2)
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert (np.diff(rows, axis=1) == 1).all()  # consecutive ids: no window crosses from one array into the next
    assert set(np.unique(rows[:, 0] // 10_000)) == {0, 1, 3}  # the 10-token array has no window of 17
    two_ranks = [get_batch(arrays, 32, 16, seed=1, step=2, rank=r, world_size=2)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(two_ranks), x)
    with pytest.raises(ValueError, match="fewer than block_size"):
        get_batch([np.arange(5), np.arange(8)], 2, 16, seed=0, step=0)

"""Batches: the (x, y) of one micro-step of one rank, a pure function of (seed, step, split, rank).

    x, y = get_batch(corpus.splits["train"], 12, 64, seed=1337, step=0)   # (B, T) int64 each
    counts = step_targets(rows, 12, seed=1337, step=0, n_micro=2)         # pairs: trained targets per slice

A split is one token array, a list of them (a prepared dataset's shards), or the PackedRows of
prompt/response pairs (corpus/pairs.py). Nothing here prints or touches files.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from corpus.pairs import PackedRows

# Part of every batch's seed, so train and val batches of the same step are independent draws.
SPLIT_ID = {"train": 0, "val": 1}


def get_batch(
    tokens: np.ndarray | Sequence[np.ndarray] | PackedRows, batch_size: int, block_size: int, *, seed: int,
    step: int, split: str = "train", micro: int = 0, n_micro: int = 1, rank: int = 0, world_size: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, (B, T) int64 each, for one micro-step of one rank.

    `tokens` is one array or a list of them (a prepared dataset's shards; a window never spans two),
    or the PackedRows of prompt/response pairs (a batch is rows, cut to its longest: T <= block_size;
    targets of -1 are not trained on).
    The global batch of a step, batch_size * n_micro * world_size windows (rows), is one draw from
    np.random.default_rng([seed, step, SPLIT_ID[split]]) over every window start of every array (every
    row): a pure function of (seed, step, split). Each (rank, micro) takes its own slice of it, so 2
    ranks x batch B, 1 process x 2 micro-steps of B and 1 process x batch 2B all see the same
    sequences, and a resumed run draws exactly the batches an uninterrupted one draws.
    """
    assert 0 <= micro < n_micro and 0 <= rank < world_size, (micro, n_micro, rank, world_size)
    chunk = rank * n_micro + micro
    if isinstance(tokens, PackedRows):
        if tokens.x.shape[1] != block_size:
            raise ValueError(f"these pairs were packed into rows of {tokens.x.shape[1]} tokens, not block_size "
                             f"{block_size}; prepare them with this block_size")
        picked = _row_draw(tokens, batch_size * n_micro * world_size, seed, step, split)
        picked = picked[chunk * batch_size:(chunk + 1) * batch_size]
        width = int(tokens.lengths[picked].max())  # the padding after the longest row is never computed
        return _to_device(tokens.x[picked, :width], tokens.y[picked, :width], device)
    arrays = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    starts_per_array = np.array([max(len(a) - block_size, 0) for a in arrays], dtype=np.int64)
    if not starts_per_array.sum():
        raise ValueError(f"{max(map(len, arrays), default=0)} tokens are fewer than block_size + 1 = "
                         f"{block_size + 1}; use a longer text or a smaller block_size")
    starts = _rng(seed, step, split).integers(0, starts_per_array.sum(), size=batch_size * n_micro * world_size)
    starts = starts[chunk * batch_size:(chunk + 1) * batch_size]
    ends = np.cumsum(starts_per_array)
    which = np.searchsorted(ends, starts, side="right")  # the array each window comes from
    offsets = starts - (ends - starts_per_array)[which]  # last start in an array: len - block_size - 1
    rows = np.empty((len(starts), block_size + 1), dtype=np.int64)  # (B, T + 1)
    for k in np.unique(which):
        mine = which == k
        rows[mine] = arrays[k][offsets[mine, None] + np.arange(block_size + 1)]  # one gather per array
    return _to_device(rows[:, :-1], rows[:, 1:], device)


def step_targets(tokens: np.ndarray | Sequence[np.ndarray] | PackedRows, batch_size: int, *, seed: int,
                 step: int, n_micro: int = 1, world_size: int = 1) -> np.ndarray | None:
    """For pairs: the trained targets of each (rank, micro) slice of the step's global train batch, as
    an array indexed by rank * n_micro + micro; None for token arrays, where every target is trained.
    Every rank computes the same numbers from (seed, step) alone, so normalizing by their sum needs no
    communication."""
    if not isinstance(tokens, PackedRows):
        return None
    picked = _row_draw(tokens, batch_size * n_micro * world_size, seed, step, "train")
    return tokens.n_targets[picked].reshape(n_micro * world_size, batch_size).sum(axis=1)


def _rng(seed: int, step: int, split: str) -> np.random.Generator:
    if split not in SPLIT_ID:
        raise ValueError(f"unknown split {split!r}; use one of: {', '.join(SPLIT_ID)}")
    # SeedSequence takes non-negative integers only; the modulo keeps any int seed usable.
    return np.random.default_rng([seed % 2**64, step, SPLIT_ID[split]])


def _row_draw(rows: PackedRows, size: int, seed: int, step: int, split: str) -> np.ndarray:
    return _rng(seed, step, split).integers(0, len(rows), size=size)


def _to_device(x: np.ndarray, y: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 tensors on the device."""
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))  # (B, T)
    if torch.device(device).type == "cuda":
        # Pinned host memory lets the copy overlap with the GPU work already queued.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)

"""How a model is laid over memory: activation checkpointing.

    blocks = apply_activation_checkpointing(model, cfg)    # the indices of the blocks that recompute

A checkpointed block keeps only its input for the backward pass and runs its forward again there
(torch.utils.checkpoint, non-reentrant): its attention, MLP and norm activations are never held, at
the cost of one more forward of that block, about a third more compute. `full` checkpoints every
block; `selective` every activation_checkpoint_every-th one (torchtitan's name for the same trade).
The RNG state is saved and restored around the recomputation, so dropout draws the same masks and the
gradients equal those of the plain model exactly (tests/training/test_parallelize.py).

The block's forward is wrapped on the instance, not the module replaced by a wrapper module: parameter
names, checkpoints and exports stay as they are, and generation (which passes a KV cache, under
no_grad) runs the plain forward.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from model import LanguageModel
from parameters import ModelConfig


def checkpointed_blocks(cfg: ModelConfig) -> list[int]:
    """The blocks whose activations are recomputed under cfg."""
    if cfg.activation_checkpointing == "none":
        return []
    every = 1 if cfg.activation_checkpointing == "full" else cfg.activation_checkpoint_every
    return list(range(0, cfg.n_layer, every))


def apply_activation_checkpointing(model: LanguageModel, cfg: ModelConfig) -> list[int]:
    """Make the chosen blocks of model recompute their activations in backward; returns their indices."""
    chosen = checkpointed_blocks(cfg)
    for i in chosen:
        block = model.transformer.h[i]
        block.forward = functools.partial(_recomputed, block.forward)
    return chosen


def _recomputed(forward: Callable, x: torch.Tensor, kv=None, pos=0) -> torch.Tensor:
    if kv is not None or not torch.is_grad_enabled():  # generation and evals: nothing to save
        return forward(x, kv, pos)
    return checkpoint(forward, x, kv, pos, use_reentrant=False)

"""How a model is laid over memory: activation checkpointing, and FSDP2's sharding over ranks.

    blocks = apply_activation_checkpointing(model, cfg)    # the indices of the blocks that recompute
    apply_fsdp(model, compute, d)                           # parallelism fsdp: each rank keeps 1/world_size
    with gathered(model): ...                               # evals, samples: whole weights, no collectives
    copy = full_copy(model, cfg)                            # rank 0: a plain model with the whole weights

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

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from model import LanguageModel
from parameters import ModelConfig
from rundir.sharded import holds_shards
from utils.device import Compute
from utils.distributed import Dist, local_part


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


# FSDP2 (torch.distributed.fsdp.fully_shard): every parameter becomes a DTensor sharded on its first dimension,
# each rank holding 1/world_size of it, and the gradients and the optimizer state (built on the sharded
# parameters) follow. A block's whole weights are all-gathered just before its forward and freed after it,
# again for its backward, whose gradients are reduce-scattered (averaged: tests/training/test_fsdp.py holds
# gloo to one process's gradients, pytorch#162338) into the shards. Parameter names do not change, so
# checkpoints, exports and the optimizer's groups see the same model. torch.distributed.fsdp and its DTensor are
# imported where they are used: about a second of start-up that only fsdp runs need.


def apply_fsdp(model: LanguageModel, compute: Compute, d: Dist) -> None:
    """Shard each block, then the root (embeddings, final norm, LM head: a tied head shares wte's shard),
    as torchtitan does. On CUDA in bfloat16 the gathered weights and the forward are bf16 while the
    shards, the gradient reduction and the optimizer stay float32. Compiling compiles each block before it
    is wrapped, so FSDP's hooks stay outside the graphs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(compute.device.type, (d.world_size,))
    half = compute.device.type == "cuda" and compute.dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute.dtype, reduce_dtype=torch.float32) if half else \
        MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compute.compiled:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Inside, every weight of a sharded model is whole on every rank and stays so across forwards, so
    evals, samples and benchmark scoring run any number of forwards (each rank its own), and call into
    submodules directly (generation's KV cache does), with no collective. It costs the whole weights'
    memory meanwhile, not the gradients' or the optimizer's. Collective on entry and exit; a no-op for
    a model that is not sharded."""
    if not holds_shards(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # the root's own setting: kept for the backward
        # FSDP records each forward's order to prefetch in the next backward; forwards that only one rank ran
        # (a sample, its share of a benchmark) would make the ranks prefetch different blocks, and the next
        # backward's all-gathers would wait on each other forever. Nothing is in flight between steps.
        _forget_forward_order(model)
        for unit in units:
            unit.reshard()


def _forget_forward_order(model: torch.nn.Module) -> None:
    """Clear the forward order FSDP recorded for the next backward's prefetch (collectives finished)."""
    if hasattr(model, "reset_iter_state"):  # torch 2.13
        model.reset_iter_state()
    else:  # older torch (2.11 on a CUDA machine here): the recorded order is the part that matters above
        model._get_fsdp_state()._comm_ctx.post_forward_order.clear()


def full_copy(model: LanguageModel, cfg: ModelConfig, grads: bool = False) -> LanguageModel | None:
    """Rank 0: a plain CPU model holding a sharded model's whole weights (and gradients, with grads),
    for the export and histograms; None on the other ranks. Collective. An unsharded model is returned
    as it is."""
    if not holds_shards(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # {} off rank 0
    whole = [p.grad.full_tensor() if grads and p.grad is not None else None for p in model.parameters()]
    if not state:
        return None
    copy = LanguageModel(cfg, model.vocab_size)
    copy.load_state_dict(state)
    for p, g in zip(copy.parameters(), whole):
        p.grad = None if g is None else g.cpu()
    return copy.train(model.training)


def local_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes this rank holds of the tensors: a DTensor's own shard only."""
    return sum(local_part(t).nbytes for t in tensors)

"""DistributedDataParallel plumbing: process group setup, rank roles, and the few collectives we use.

    torchrun --nproc_per_node=2 train.py --config debug        # CPU: gloo; CUDA: NCCL, a GPU per rank

A plain `python train.py` is world size 1 and every call here is a cheap no-op. Rank 0 owns the run
directory, tracking, checkpoints and exports; the others learn the run directory by broadcast.
Decisions that end the loop (stop requests, NaN, early stopping) are reduced over a CPU (gloo)
group, so every rank leaves the loop at the same step and none waits forever for another.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    control: Any = None  # a gloo group for small CPU-side agreements

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dtensor(t: Any) -> bool:
    """Whether t is a DTensor (an fsdp shard), without importing torch.distributed.tensor: that import
    costs every stage about a second of start-up, and no DTensor exists before something has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_part(t: Any) -> Any:
    """What this rank holds of t: a DTensor's own shard; any other tensor whole."""
    return t.to_local() if is_dtensor(t) else t


def setup(device_name: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun; returns (Dist, device name for this rank)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Dist(), device_name
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # pin this rank to its own GPU before NCCL touches any
        device_name = f"cuda:{local_rank}"
    elif device_name == "auto":
        device_name = "cpu"  # gloo runs on CPU tensors; MPS has no multi-process backend
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return Dist(rank, local_rank, world, control), device_name


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's obj, on every rank (picklable; used only for a path and a few small values)."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=d.control)
    return box[0]


def gather(d: Dist, obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj, group=d.control)
    return out


def any_rank(d: Dist, flag: bool) -> bool:
    """True on every rank if it is true on any: a stop asked of one rank stops all of them."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())


def mean_across(d: Dist, values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks (losses for logging, eval, NaN checks); a NaN anywhere spreads."""
    if not d.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / d.world_size


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier(group=d.control)

"""Sharded checkpoints (parallelism fsdp), and loading any checkpoint into any layout of the model.

    write_shards(tmp, model, optimizer)          # every rank its shards, through torch.distributed.checkpoint
    hashes = hash_files(tmp, SHARDS, d)           # the ranks hash the files between them
    load_shards(path, model, optimizer)           # on any world size, or one process: resharded on the way in
    weights = read_shard_weights(path)            # the whole weights, in one process (inference, evaluate)

An fsdp run's checkpoint keeps checkpoint.py's promises (atomic, hash-verified, rotated) and holds
  sharded/      DCP's files: one __<rank>_0.distcp per rank that wrote it, and .metadata, which says
                which slice of which tensor each holds: parameters and optimizer state by parameter name
  trainer.pt    the GradScaler and RNG states (the optimizer state is in sharded/)
  meta.json     as for a full checkpoint, with "format": "sharded" and the SHA-256 of every file above
Neither layout is tied to the run's: a full checkpoint (one process, DDP) loads into a sharded model,
each rank taking its slices, and a sharded one into a plain model, by the same parameter names.
Multi-node fsdp runs need the run directory on a filesystem every node sees, as DCP does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from utils import distributed
from utils.distributed import Dist, is_dtensor, local_part
from utils.files import sha256_file

# torch.distributed.checkpoint (DCP) is imported where it is used: it brings DTensor and sympy, about a
# second of start-up for every stage, and only fsdp runs and their checkpoints need it.

SHARDS = "sharded"
METADATA = f"{SHARDS}/.metadata"


def holds_shards(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(is_dtensor(p) for p in model.parameters())


def local_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, this rank's tensor) for every weight and optimizer state tensor: a DTensor's own shard."""
    named = [*model.state_dict().items(),
             *((f"optimizer state {i}.{k}", v) for i, state in optimizer.state_dict()["state"].items()
               for k, v in state.items())]
    return [(n, local_part(t)) for n, t in named if isinstance(t, torch.Tensor)]


def write_shards(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state into tmp/sharded (collective;
    DCP raises on every rank if any rank's write failed). Files are fsynced."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             storage_writer=dcp.FileSystemWriter(tmp / SHARDS, sync_files=True))


def hash_files(root: Path, folder: str, d: Dist) -> dict[str, str]:
    """SHA-256 of every file under root/folder, keyed by its path from root; the ranks share the work
    (every world_size-th file each) and every rank gets the whole table."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob("*") if p.is_file())
    mine = {name: sha256_file(root / name) for name in files[d.rank::d.world_size]}
    return {k: v for part in distributed.gather(d, mine) for k, v in part.items()}


def load_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A sharded checkpoint's weights (and optimizer state) into the model as it is laid out now: shards
    on this world size, or whole tensors in one process or under DDP. Collective under torchrun."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        _load(state, dcp.FileSystemReader(path / SHARDS))
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _load(state, dcp.FileSystemReader(path / SHARDS))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load(state: dict[str, Any], reader: Any) -> None:
    """dcp.load from a FileSystemReader, collective under torchrun; in one process without DCP's warning
    that it assumes one."""
    import torch.distributed.checkpoint as dcp
    if dist.is_initialized():
        dcp.load(state, storage_reader=reader)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)


def read_shard_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded checkpoint as CPU tensors named as in the model's state_dict, read
    in one process: what inference.py and serve.py load from an fsdp run's checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path / SHARDS)
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in reader.read_metadata().state_dict_metadata.items()
               if name.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    _load(tensors, reader)
    return {name.removeprefix("model."): t for name, t in tensors.items()}


def load_full_into_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                          weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any] | None) -> None:
    """A full checkpoint (one process or DDP: whole tensors, the optimizer's state keyed by parameter
    index) into a sharded model: each rank keeps its slices."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    aliases: dict[int, list[str]] = {}  # a tied head and embedding: one tensor, stored under one of its names
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for group in aliases.values():
        stored = [n for n in group if n in weights]
        for name in group:
            if stored and name not in weights:
                weights[name] = weights[stored[0]]
    set_model_state_dict(model, weights, options=options)
    if optimizer is None or optimizer_state is None:
        return
    # torch's optimizer state_dict numbers the parameters in param_groups' order; DCP's names them.
    index = {id(p): n for n, p in model.named_parameters()}
    order = [index[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: s for i, s in optimizer_state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                                for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


"""Training checkpoints that survive anything: atomic, hash-verified, rotated, exactly resumable.

artifacts/checkpoints/step_000500/ holds
  model.safetensors   weights of the uncompiled model
  trainer.pt          optimizer and GradScaler state, torch CPU/CUDA RNG states (weights_only load)
  meta.json           iteration, best val loss, config, tokenizer, Aim hash, python/numpy RNG states,
                      the loss window, the SHA-256 of the two files above, and a SHA-256 of its own
                      content (meta_sha256), so an edited or truncated meta.json is refused too
An fsdp run's checkpoint holds its shards instead of model.safetensors and the optimizer state
(rundir/sharded.py); either kind loads into a run of any layout and world size.
It is written into a hidden temp directory and renamed into place, so a SIGKILL at any moment
leaves either the whole checkpoint or none (the temp leftovers are swept on the next save).
best.json names the checkpoint with the best val loss; rotation keeps the last `keep` and that one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import safetensors.torch
import torch

from utils import distributed
from utils.distributed import Dist
from utils.files import atomic_write_json, sha256_file
from rundir.sharded import (METADATA, SHARDS, hash_files, holds_shards, load_full_into_shards, load_shards,
                            local_tensors, write_shards)

PREFIX = "step_"
WEIGHTS, TRAINER = "model.safetensors", "trainer.pt"
FILES = (WEIGHTS, TRAINER)  # a full checkpoint's; a sharded one has TRAINER and SHARDS/


@dataclass
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def iteration(self) -> int:
        return self.meta["iteration"]


def capture_rng() -> dict[str, Any]:
    """Every RNG a run draws from; python's and numpy's as JSON, torch's as tensors for trainer.pt."""
    np_state = np.random.get_state()
    return {
        "python": _jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(meta: dict[str, Any], trainer: dict[str, Any]) -> None:
    py = meta["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = meta["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])


def save_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, meta: dict[str, Any], extra: dict[str, Any] | None = None,
                    d: Dist = Dist()) -> Path:
    """Write step_<iteration>/ atomically; meta (JSON) must hold "iteration"; extra (tensors, e.g. every
    rank's RNG state) goes into trainer.pt. Returns the checkpoint path. Weights or optimizer state that
    are not finite are refused (ValueError): a checkpoint is always one that training can go on from.
    A sharded model is saved by every rank together (collective), each writing its own shards; otherwise
    rank 0 alone calls this."""
    final = ckpt_dir / f"{PREFIX}{meta['iteration']:06d}"
    sharded = holds_shards(model)
    d = d if sharded else Dist()  # a full checkpoint is rank 0's alone: nothing here waits for another rank
    problems = distributed.gather(d, nonfinite(local_tensors(model, optimizer)))
    if problem := next(filter(None, problems), None):
        raise ValueError(f"checkpoint {final.name} not written: {problem}")
    # One temp directory for every rank, named after rank 0's process (rotate() sweeps a dead writer's).
    tmp = ckpt_dir / f".tmp_{final.name}_{distributed.broadcast(d, os.getpid())}"
    if d.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier(d)
    failed = None
    try:
        hashes = {}
        if sharded:
            write_shards(tmp, model, optimizer)  # DCP raises on every rank if any rank's write failed
            hashes = hash_files(tmp, SHARDS, d)
        if d.is_main:
            _write_rest(tmp, model, optimizer, scaler, {**meta, "format": "sharded" if sharded else "full"}, extra,
                        hashes)
    except BaseException as e:
        if d.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint never stays behind
        # torch.save reports a failed write as a RuntimeError
        full_disk = _disk_full(e, ckpt_dir, model, optimizer) if isinstance(e, (OSError, RuntimeError)) else None
        if not d.enabled:
            if full_disk:
                raise full_disk from None
            raise
        failed = str(full_disk or f"checkpoint {final.name} not written: {type(e).__name__}: {e}")
    if d.enabled:  # every rank fails together, or none does
        if failed := next(filter(None, distributed.gather(d, failed)), None):
            raise ValueError(failed)
    if d.is_main:
        if final.exists():  # a step saved again, after resuming from before a damaged newer checkpoint
            _remove(final)
        os.rename(tmp, final)
        _fsync(ckpt_dir)
    return final


def _write_rest(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                meta: dict[str, Any], extra: dict[str, Any] | None, hashes: dict[str, str]) -> None:
    """Rank 0's part of a save: the weights and optimizer state of a full checkpoint, trainer.pt, and
    meta.json with every file's SHA-256 (hashes: the shards', already hashed)."""
    rng = capture_rng()
    trainer = {"scaler": scaler.state_dict(), "torch_rng": rng.pop("torch"), "cuda_rng": rng.pop("cuda"),
               **(extra or {})}
    names = [TRAINER]
    if meta["format"] == "full":
        safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        trainer["optimizer"] = optimizer.state_dict()
        names.append(WEIGHTS)
    torch.save(trainer, tmp / TRAINER)
    for name in names:
        _fsync(tmp / name)
    hashes = {**hashes, **{name: sha256_file(tmp / name) for name in names}}
    meta = {**meta, "rng": rng, "sha256": dict(sorted(hashes.items()))}
    atomic_write_json(tmp / "meta.json", {**meta, "meta_sha256": _digest(meta)})
    _fsync(tmp)


def check_finite(named: Iterable[tuple[str, Any]], what: str) -> None:
    """ValueError naming the first tensor that holds a NaN or an inf: `what` (a checkpoint, an export) is
    not written from it."""
    if problem := nonfinite(named):
        raise ValueError(f"{what} not written: {problem}")


def nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """What is wrong with the first tensor that holds a NaN or an inf, or None."""
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            return f"{name} holds non-finite values (NaN or inf); the weights diverged"
    return None


def _disk_full(error: BaseException, ckpt_dir: Path, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer) -> ValueError | None:
    """A one-line ValueError if `error` came from a full disk (or quota): where, and how much room."""
    needed = sum(t.nbytes for _, t in local_tensors(model, optimizer))
    free = shutil.disk_usage(ckpt_dir).free
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed:
        return ValueError(f"disk full at {ckpt_dir}: a checkpoint needs about {needed / 1e6:,.0f} MB and "
                          f"{free / 1e6:,.0f} MB are free; the last good checkpoint is kept. Free some space "
                          "and continue with --resume")
    return None


def find_checkpoints(ckpt_dir: Path) -> list[Path]:
    """step_* directories, oldest first; hidden temp directories are never listed."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint that is whole and unedited; ValueError saying what is wrong otherwise.

    meta.json must carry its own digest, the recorded SHA-256 of both files, and the iteration its
    directory is named after: what resume trusts is exactly what was written.
    """
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint '{path}' has no readable meta.json ({type(e).__name__})") from None
    if not isinstance(meta, dict) or "meta_sha256" not in meta:
        raise ValueError(f"checkpoint '{path}': meta.json is not a checkpoint record (no meta_sha256)")
    digest = meta.pop("meta_sha256")
    if digest != _digest(meta):
        raise ValueError(f"checkpoint '{path}': meta.json does not match its recorded digest (edited or damaged)")
    files = meta.get("sha256", {})
    if meta.get("format") == "sharded":  # trainer.pt and DCP's files, at least its .metadata
        described = {TRAINER, METADATA} <= set(files) and all(
            n == TRAINER or (n.startswith(f"{SHARDS}/") and ".." not in Path(n).parts) for n in files)
    else:
        described = set(files) == set(FILES)
    if meta.get("iteration") != _step_of(path) or not described:
        raise ValueError(f"checkpoint '{path}': meta.json does not describe {path.name}")
    for name, expected in files.items():
        if not (path / name).is_file():
            raise ValueError(f"checkpoint '{path}': {name} is missing")
        if sha256_file(path / name) != expected:
            raise ValueError(f"checkpoint '{path}': {name} does not match its recorded SHA-256 (damaged)")
    return meta


def _digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the record in one canonical form (sorted keys), the same after a JSON round trip."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(PREFIX)
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def latest_good(ckpt_dir: Path, skipped: list[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies; one line per newer one that did not goes to `skipped`."""
    for path in reversed(find_checkpoints(ckpt_dir)):
        try:
            return Checkpoint(path, verify(path))
        except ValueError as e:
            if skipped is not None:
                skipped.append(f"{e}; falling back to an earlier checkpoint")
    return None


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / METADATA).is_file()


def load_weights(path: Path, model: torch.nn.Module, device: torch.device) -> None:
    """Only the weights of a checkpoint (e.g. the best one, for the export of an early-stopped run), into
    the model as it is laid out (collective when either side is sharded)."""
    if is_sharded_checkpoint(path):
        load_shards(path, model, None)
    elif holds_shards(model):
        load_full_into_shards(model, None, safetensors.torch.load_file(path / WEIGHTS), None)
    else:
        safetensors.torch.load_model(model, str(path / WEIGHTS), strict=True, device=str(device))


def load_checkpoint(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None, device: torch.device) -> dict[str, Any]:
    """Weights, optimizer, scaler and every RNG state back into place (no pickle: weights_only);
    returns trainer.pt's contents for callers that stored extras. Either kind of checkpoint, full or
    sharded, goes into the model as it is laid out now: one process, DDP or fsdp on any world size."""
    try:
        trainer = torch.load(ckpt.path / TRAINER, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        # torch's own message advises weights_only=False, which would run whatever code the file holds.
        raise ValueError(f"checkpoint '{ckpt.path}': {TRAINER} holds something other than tensors and plain "
                         f"data ({type(e).__name__}), and gptlab never unpickles code; resume from an earlier "
                         "checkpoint, or start a new run") from None
    if is_sharded_checkpoint(ckpt.path):
        load_shards(ckpt.path, model, optimizer)
    elif holds_shards(model):
        load_full_into_shards(model, optimizer, safetensors.torch.load_file(ckpt.path / WEIGHTS),
                              trainer["optimizer"])
    else:
        load_weights(ckpt.path, model, device)
        if optimizer is not None:
            optimizer.load_state_dict(trainer["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(trainer["scaler"])
    trainer["torch_rng"] = trainer["torch_rng"].cpu()
    trainer["cuda_rng"] = [s.cpu() for s in trainer["cuda_rng"]]
    restore_rng(ckpt.meta, trainer)
    return trainer


def mark_best(ckpt_dir: Path, path: Path, val_loss: float) -> None:
    atomic_write_json(ckpt_dir / "best.json", {"checkpoint": path.name, "val_loss": val_loss})


def best_checkpoint(ckpt_dir: Path) -> Path | None:
    try:
        name = json.loads((ckpt_dir / "best.json").read_text(encoding="utf-8"))["checkpoint"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None
    return ckpt_dir / name if (ckpt_dir / name).is_dir() else None


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints and the best one; sweep temp leftovers."""
    best = best_checkpoint(ckpt_dir)
    for old in find_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        if old != best:
            _remove(old)
    for tmp in ckpt_dir.glob(".tmp_*"):
        if not _writer_alive(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process named in a temp directory's name (..._<pid>) is this one or still alive:
    its save may be in progress, so only a dead writer's leftovers are swept."""
    pid = tmp.name.rsplit("_", 1)[-1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving half of it under its real name: one
    atomic rename out of sight first (a kill then leaves a .tmp_ leftover that rotate() sweeps)."""
    trash = path.parent / f".tmp_trash_{path.name}_{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj: Any) -> Any:
    return [_jsonable(x) for x in obj] if isinstance(obj, (tuple, list)) else obj

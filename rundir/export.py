"""Exports: the trained model as safetensors + JSON, and loading one back into a LanguageModel, verified.

artifacts/export/ holds model.safetensors (weights of the uncompiled model; the config and the
tokenizer also ride in its metadata, so the file stands alone), config.json, tokenizer.json, and
export.json: the SHA-256 of the other three, written last. Loading checks every hash, so a flipped
byte in the weights or an edited tokenizer is refused with a line naming the file, never used.
Beside them, hf/ holds the same model in Hugging Face transformers' layout (rundir/hf_export.py), written
after the manifest; a model with no such layout gets a one-line note instead.
Exports written before export.json existed load with a note that they are unverified.
No pickles: an export someone hands you cannot run code when loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from model import LanguageModel
from parameters import ModelConfig
from tokenizer import Tokenizer, tokenizer_from_dict
from rundir.checkpoint import check_finite, is_sharded_checkpoint, verify
from utils import files
from utils.files import MAX_JSON_BYTES, atomic_path, atomic_write_json, sha256_file
from rundir.hf_export import remove_hf_export, write_hf_export
from rundir.hf_import import is_hf_model_dir, read_hf_model
from rundir.lock import run_state
from rundir.resume import checkpoint_by_path, find_checkpoint
from rundir.run_dir import RunDir, resolve_run
from rundir.sharded import read_shard_weights
from rundir.snapshot import Snapshot, build_model

WEIGHTS = "model.safetensors"
MANIFEST = "export.json"
HASHED = (WEIGHTS, "config.json", "tokenizer.json")
FORMAT = "gptlab-export-1"  # in the weights' metadata: such an export must have its manifest


def save_export(export_dir: Path, model: torch.nn.Module, config: dict, tokenizer: dict) -> None:
    """Write the export; the manifest goes last, so a complete, checkable export is one with export.json.
    Then hf/, the Hugging Face view of it (or a note on stderr saying why there is none). Non-finite
    weights are refused (ValueError) before anything is touched: an export is always usable."""
    check_finite(model.state_dict().items(), f"export {export_dir}")
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / MANIFEST).unlink(missing_ok=True)  # a stale manifest must never vouch for new files
    remove_hf_export(export_dir)  # nor a stale hf/ stand beside new weights
    atomic_write_json(export_dir / "config.json", config)
    atomic_write_json(export_dir / "tokenizer.json", tokenizer)
    with atomic_path(export_dir / WEIGHTS) as tmp:
        # save_model drops the tied lm_head.weight (it aliases wte.weight); load_model restores the tie.
        metadata = {"format": "pt", "gptlab": FORMAT, "config": json.dumps(config), "tokenizer": json.dumps(tokenizer)}
        safetensors.torch.save_model(model, str(tmp), metadata=metadata)
    atomic_write_json(export_dir / MANIFEST, {"format": FORMAT,
                                              "sha256": {name: sha256_file(export_dir / name) for name in HASHED}})
    if note := write_hf_export(export_dir, model, config, tokenizer):
        print(note, file=sys.stderr)


def export_dir_of(path: str | Path) -> Path:
    """Accept a run directory or its export directory."""
    path = Path(path)
    return RunDir(path).export if RunDir.looks_like_one(path) else path


class Export(NamedTuple):
    """A loaded model with what it needs to be used: unpacks as (model, tokenizer, config)."""
    model: LanguageModel  # in eval mode, on the device asked for
    tokenizer: Tokenizer
    config: ModelConfig


def read_export(path: str | Path) -> Snapshot:
    """The verified export of a run directory or an export directory; every way one can be damaged is a
    ValueError/FileNotFoundError naming the file. An export from before hashes loads with a note."""
    export_dir = export_dir_of(path)
    weights = export_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"'{export_dir}' has no {WEIGHTS}: point at a run directory with an export")
    verified = verify_export(export_dir)
    snapshot = _snapshot(read_json(export_dir / "config.json"), read_json(export_dir / "tokenizer.json"),
                         export_dir / "config.json", "config.json and tokenizer.json", weights)
    if not verified:  # said once it loaded: a folder that fails to load gets its error alone
        print(f"note: {export_dir} was written before exports carried hashes; loading it unverified",
              file=sys.stderr)
    return snapshot


def read_checkpoint_model(path: Path) -> Snapshot:
    """A training checkpoint's model, verified as resume verifies it; an fsdp run's shards are read
    whole."""
    meta = verify(path)
    weights = read_shard_weights(path) if is_sharded_checkpoint(path) else path / WEIGHTS
    return _snapshot(meta["config"], meta["tokenizer"], path / "meta.json", "meta.json", weights)


def read_init_source(path: str | Path) -> Snapshot:
    """--init-from's start: a gptlab run or export directory, or a local Hugging Face transformers model
    folder (config.json with a model_type, model.safetensors)."""
    return read_hf_model(path) if is_hf_model_dir(path) else read_export(path)


def load_export(path: str | Path, device: torch.device | str = "cpu") -> Export:
    """(model in eval mode on device, tokenizer, config) from a run directory or an export directory."""
    snapshot = read_export(path)
    return Export(build_model(snapshot, device=device), snapshot.tokenizer, snapshot.config)


def load_init_source(path: str | Path, device: torch.device | str = "cpu") -> Export:
    """--init-from's start as load_export returns it (read_init_source, built)."""
    snapshot = read_init_source(path)
    return Export(build_model(snapshot, device=device), snapshot.tokenizer, snapshot.config)


def load_checkpoint_model(path: Path, device: torch.device | str = "cpu") -> Export:
    """(model in eval mode, tokenizer, config) from a training checkpoint, verified as resume verifies it."""
    snapshot = read_checkpoint_model(path)
    return Export(build_model(snapshot, device=device), snapshot.tokenizer, snapshot.config)


class Loaded(NamedTuple):
    """A model to generate from, and what it is: what inference.py and serve.py load."""
    model: LanguageModel  # in eval mode, on the device asked for
    tokenizer: Tokenizer
    config: ModelConfig  # the config it was trained with
    described: str  # "<run> | export", or "<run> (failed: ...) | checkpoint step_N", for the user
    run: RunDir


def load_for_generation(run: str, checkpoint: str, runs_dir: str, device: torch.device | str = "cpu") -> Loaded:
    """A run's export (run: a run directory, its export/ folder, or `latest`), or one of its checkpoints
    (checkpoint: best, latest or step_N; or run naming a checkpoints/step_N folder itself): how steps
    are compared."""
    if found := checkpoint_by_path(Path(run), runs_dir):
        run_dir, ckpt = found
    elif checkpoint:
        run_dir = resolve_run(run, runs_dir, need_export=False)
        ckpt = find_checkpoint(run_dir, checkpoint)
    else:
        run_dir = resolve_run(run, runs_dir)
        return Loaded(*load_export(run_dir.path, device), _describe(run_dir, "export"), run_dir)
    return Loaded(*load_checkpoint_model(ckpt, device), _describe(run_dir, f"checkpoint {ckpt.name}"), run_dir)


def _describe(run: RunDir, what: str) -> str:
    state = run_state(run.path)
    ended = "" if state.state == "completed" else f" ({state.state}{': ' + state.detail if state.detail else ''})"
    return f"{run}{ended} | {what}"


def _snapshot(raw_config: object, raw_tokenizer: object, config_file: Path, described_by: str,
              weights: Path | dict[str, torch.Tensor]) -> Snapshot:
    """What a config, a tokenizer and a weights file (or tensors already read) describe; one-line errors
    naming the file."""
    config = ModelConfig.from_dict(raw_config, str(config_file))
    tokenizer = tokenizer_from_dict(raw_tokenizer)
    if isinstance(weights, dict):
        return Snapshot(weights, tokenizer, config, f"{config_file.parent} does not fit {described_by}")
    try:
        tensors = safetensors.torch.load_file(str(weights))
    except (OSError, safetensors.SafetensorError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    return Snapshot(tensors, tokenizer, config, f"{weights} does not fit {described_by}")


def verify_export(export_dir: Path) -> bool:
    """Check every file against export.json: True once they match. An export without one must predate it
    (else it is incomplete): False, for the caller to load unverified."""
    manifest_path = export_dir / MANIFEST
    if not manifest_path.is_file():
        if _format_of(export_dir / WEIGHTS) == FORMAT:
            raise ValueError(f"export '{export_dir}' is incomplete: {MANIFEST} is missing (its writer was stopped); "
                             "export again, e.g. from a checkpoint with --resume")
        _check_legacy_config(export_dir)
        return False
    manifest = read_json(manifest_path)
    hashes = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(hashes, dict) or set(hashes) != set(HASHED):
        raise ValueError(f"{manifest_path}: not an export manifest (expected SHA-256 of {', '.join(HASHED)})")
    for name in HASHED:
        if not (export_dir / name).is_file():
            raise FileNotFoundError(f"export file '{export_dir / name}' is missing; the export is incomplete")
        if sha256_file(export_dir / name) != hashes[name]:
            raise ValueError(f"export file '{export_dir / name}' does not match its SHA-256 in {MANIFEST} "
                             "(damaged or edited); export again, or use a checkpoint")
    return True


def _check_legacy_config(export_dir: Path) -> None:
    """A folder of weights without export.json can only be an old gptlab export if its config.json can be
    read; without one it is neither that nor a Hugging Face folder (whose config.json names its model_type)."""
    try:
        read_json(export_dir / "config.json")
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"'{export_dir}' has {WEIGHTS} but no readable config.json ({e}): it is neither a gptlab "
                         "export nor a Hugging Face model folder (whose config.json names its model_type)") from None


def _format_of(weights: Path) -> str | None:
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            return (f.metadata() or {}).get("gptlab")
    except (OSError, safetensors.SafetensorError):
        return None  # a damaged header: load_export reports it when it reads the weights


def read_json(path: Path) -> object:
    """Parsed JSON of an export or run file (utils/files.read_json); a missing one means an incomplete export."""
    try:
        return files.read_json(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"export file '{path}' is missing; the export is incomplete") from None


def record_init_source(run_dir: Path, source: str | Path) -> str:
    """meta/init_from.json: where a fine-tuned run's starting weights came from, with their SHA-256."""
    record = {"init_from": str(Path(source).resolve()),
              "model_sha256": sha256_file(export_dir_of(source) / WEIGHTS)}
    atomic_write_json(RunDir(run_dir).init_source_file, record)
    return record["init_from"]

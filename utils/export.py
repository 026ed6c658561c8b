"""Exports: the trained model as safetensors + JSON, and loading one back into a LanguageModel.

artifacts/export/ holds model.safetensors (weights of the uncompiled model; the config and the
tokenizer also ride in its metadata, so the file stands alone), config.json and tokenizer.json.
No pickles: an export someone hands you cannot run code when loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch

from config import check_values
from model import LanguageModel
from parameters import ModelConfig
from tokenizer import tokenizer_from_dict
from utils.files import atomic_write_json, sha256_file

WEIGHTS = "model.safetensors"


def save_export(export_dir: Path, model: torch.nn.Module, config: dict, tokenizer: dict) -> None:
    """Write the export atomically; the weights go last, so their presence means a complete export."""
    export_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(export_dir / "config.json", config)
    atomic_write_json(export_dir / "tokenizer.json", tokenizer)
    tmp = export_dir / f".{WEIGHTS}.{os.getpid()}.tmp"
    try:
        # save_model drops the tied lm_head.weight (it aliases wte.weight); load_model restores the tie.
        metadata = {"format": "pt", "config": json.dumps(config), "tokenizer": json.dumps(tokenizer)}
        safetensors.torch.save_model(model, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, export_dir / WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)


def export_dir_of(path: str | Path) -> Path:
    """Accept a run directory or its export directory."""
    path = Path(path)
    return path / "artifacts" / "export" if (path / "artifacts").is_dir() else path


def load_export(path: str | Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, object, ModelConfig]:
    """(model in eval mode on device, tokenizer, config) from a run directory or an export directory."""
    export_dir = export_dir_of(path)
    weights = export_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"'{export_dir}' has no {WEIGHTS}: point at a run directory with an export")
    config = ModelConfig(**check_values(ModelConfig, _read_json(export_dir / "config.json"), str(export_dir)))
    tokenizer = tokenizer_from_dict(_read_json(export_dir / "tokenizer.json"))
    model = LanguageModel(config, tokenizer.vocab_size)
    safetensors.torch.load_model(model, str(weights), strict=True, device=str(device))
    return model.to(device).eval(), tokenizer, config


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"export file '{path}' is missing; the export is incomplete") from None


def record_init_source(run_dir: Path, source: str | Path) -> str:
    """meta/init_from.json: where a fine-tuned run's starting weights came from, with their SHA-256."""
    record = {"init_from": str(Path(source).resolve()),
              "model_sha256": sha256_file(export_dir_of(source) / WEIGHTS)}
    atomic_write_json(run_dir / "meta" / "init_from.json", record)
    return record["init_from"]

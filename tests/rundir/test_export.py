"""utils/export.py: exports carry hashes, and every way one can be damaged is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model import LanguageModel
from parameters import ModelConfig
from tokenizer import CharTokenizer
from rundir.export import load_export, save_export

TOKENIZER = CharTokenizer.from_text("abcdefghij \n")


@pytest.fixture
def export(tiny_cfg: ModelConfig, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = LanguageModel(tiny_cfg, TOKENIZER.vocab_size)
    save_export(tmp_path / "export", model, tiny_cfg.to_dict(), TOKENIZER.to_dict())
    return tmp_path / "export"


def test_non_finite_weights_are_never_exported_and_the_previous_export_stays(export: Path, tiny_cfg: ModelConfig):
    before = {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()}
    model = LanguageModel(tiny_cfg, TOKENIZER.vocab_size)
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not written: transformer.wte.weight holds non-finite values"):
        save_export(export, model, tiny_cfg.to_dict(), TOKENIZER.to_dict())
    assert {p.name: p.read_bytes() for p in export.iterdir() if p.is_file()} == before
    load_export(export)  # still whole and verified


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def swap_two_characters(path: Path) -> None:
    """The edit that decoded wrongly, silently, before exports were hashed."""
    tok = json.loads(path.read_text())
    tok["chars"][2], tok["chars"][3] = tok["chars"][3], tok["chars"][2]
    path.write_text(json.dumps(tok, indent=2))


def test_the_manifest_holds_the_hash_of_every_file(export: Path):
    manifest = json.loads((export / "export.json").read_text())
    assert set(manifest["sha256"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    model, tok, cfg = load_export(export)
    assert tok.to_dict() == TOKENIZER.to_dict() and cfg.n_layer == 2


@pytest.mark.parametrize("damage, message", [
    (lambda e: flip_last_byte(e / "model.safetensors"), "model.safetensors' does not match its SHA-256"),
    (lambda e: swap_two_characters(e / "tokenizer.json"), "tokenizer.json' does not match its SHA-256"),
    (lambda e: (e / "config.json").write_text("[]"), "config.json' does not match its SHA-256"),
    (lambda e: (e / "export.json").unlink(), "is incomplete: export.json is missing"),
    (lambda e: (e / "export.json").write_text('{"sha256": {}}'), "not an export manifest"),
    (lambda e: (e / "tokenizer.json").unlink(), "tokenizer.json' is missing"),
])
def test_a_damaged_export_is_refused_naming_the_file(export: Path, damage, message: str):
    damage(export)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_export(export)


def unhashed(export: Path, tiny_cfg: ModelConfig, **files: str) -> Path:
    """The export as gptlab wrote it before exports carried hashes, with some files replaced."""
    (export / "export.json").unlink()
    state = safetensors.torch.load_file(export / "model.safetensors")
    safetensors.torch.save_file(state, export / "model.safetensors", metadata={"format": "pt"})
    for name, text in files.items():
        (export / f"{name}.json").write_text(text)
    return export


def test_an_export_from_before_hashes_loads_with_a_note(export: Path, tiny_cfg: ModelConfig, capsys):
    load_export(unhashed(export, tiny_cfg))
    assert "loading it unverified" in capsys.readouterr().err


@pytest.mark.parametrize("files, message", [
    ({"config": "[1, 2]"}, "config.json: expected a mapping of config keys, got list"),
    ({"config": '{"n_layer": 2, "n_embd": 30, "n_head": 4}'}, "n_embd: 30 is not divisible by n_head=4"),
    ({"tokenizer": "{not json"}, "tokenizer.json is not valid JSON"),
    ({"tokenizer": "[" * 100_000 + "]" * 100_000}, "tokenizer.json nests too deeply"),
    ({"tokenizer": json.dumps(CharTokenizer.from_text("abc").to_dict())}, r"does not fit config.json and tokenizer.json \(vocab 3\)"),
])
def test_inconsistent_files_are_one_line_errors(export: Path, tiny_cfg: ModelConfig, files: dict, message: str):
    with pytest.raises(ValueError, match=message):
        load_export(unhashed(export, tiny_cfg, **files))


def test_a_damaged_safetensors_header_names_the_file(export: Path, tiny_cfg: ModelConfig):
    unhashed(export, tiny_cfg)
    (export / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_export(export)


def test_an_oversized_json_file_is_refused_before_it_is_read(export: Path, tiny_cfg: ModelConfig, monkeypatch):
    import rundir.export
    monkeypatch.setattr(rundir.export, "MAX_JSON_BYTES", 100)
    with pytest.raises(ValueError, match="more than any file gptlab writes"):
        load_export(unhashed(export, tiny_cfg))


def test_the_readme_snippet_for_using_an_export_runs(trained_run: Path, tmp_path: Path):
    """The README's "Using an export from your own code", run as it says: PYTHONPATH and a run directory."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Using an export from your own code"):]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start:section.index("\n```", start)]
    script = tmp_path / "use_export.py"
    script.write_text(snippet.replace('"ROMEO:"', '"All:"'))  # characters the test corpus has
    res = subprocess.run([sys.executable, str(script), str(trained_run)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("All:") and len(res.stdout) > len("All:") + 20

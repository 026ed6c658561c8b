"""utils/files.py: the one atomic write, and hashing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from utils.files import atomic_write_bytes, atomic_write_json, sha256_file


def test_atomic_writes(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_bytes(path, b"abc")
    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})
    assert path.read_bytes() == b"abc" and sorted(os.listdir(tmp_path)) == ["f.json"]

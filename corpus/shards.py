"""The on-disk format of a prepared token dataset (data/tokens/<name>/), and reading one: what
corpus/prepare.py writes and training memory-maps.

    ds = open_dataset("data/tokens/web")      # ds.splits["train"]: a list of memory-mapped id arrays
    writer = ShardWriter(root, np.dtype("uint16")); writer.write(0, ids, documents=1, n_bytes=42)
    manifest["shards"] += writer.commit(first_index=len(manifest["shards"])); write_manifest(root, manifest)

A directory holds:
  manifest.json      the sources (path, size, mtime, SHA-256), the tokenizer and its fingerprint, the
                     settings, the split rule, every shard (split, tokens, documents, UTF-8 bytes,
                     SHA-256), the totals per split, and while unfinished the cursor to continue from
  tokenizer.json     bpe only: the trained tokenizer in Hugging Face's format
  shard_NNNNNN.bin   little-endian uint16 ids (uint32 past 65,536 ids); each shard is one split's,
                     except in a one-document dataset, whose single shard is split at its tail

Opening one costs the same at any size: the manifest is read, every shard's size is checked against
it, and the shards are memory-mapped; nothing is hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tokenizer import Tokenizer, tokenizer_from_dict
from utils.files import atomic_write_bytes

FORMAT = "gptlab-tokens"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (char, GPT-2), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass
class _OpenShard:
    file: BinaryIO
    path: Path
    digest: Any
    tokens: int = 0
    documents: int = 0
    bytes: int = 0


class ShardWriter:
    """Streams ids into one temp file per split; commit() renames them in as the next shards."""

    def __init__(self, root: Path, dtype: np.dtype):
        self.root, self.dtype = root, dtype.newbyteorder("<")
        self.open: dict[int, _OpenShard] = {}

    def write(self, split: int, ids: np.ndarray, documents: int, n_bytes: int) -> None:
        if not len(ids):
            return
        if split not in self.open:
            path = self.root / f".{SPLITS[split]}.{os.getpid()}.tmp"
            self.open[split] = _OpenShard(open(path, "wb"), path, hashlib.sha256())
        shard = self.open[split]
        data = memoryview(np.ascontiguousarray(ids, dtype=self.dtype)).cast("B")
        shard.file.write(data)
        shard.digest.update(data)
        shard.tokens += len(ids)
        shard.documents += documents
        shard.bytes += n_bytes

    @property
    def tokens(self) -> int:
        return sum(shard.tokens for shard in self.open.values())

    def commit(self, first_index: int) -> list[dict]:
        """Close, fsync and rename the open shards in (train first); their manifest entries."""
        entries = []
        for split in sorted(self.open):
            shard = self.open[split]
            shard.file.flush()
            os.fsync(shard.file.fileno())
            shard.file.close()
            name = f"shard_{first_index + len(entries):06d}.bin"
            os.replace(shard.path, self.root / name)
            entries.append({"file": name, "split": SPLITS[split], "tokens": shard.tokens,
                            "documents": shard.documents, "bytes": shard.bytes, "sha256": shard.digest.hexdigest()})
        self.open = {}
        return entries

    def discard(self) -> None:
        for shard in self.open.values():
            with contextlib.suppress(OSError):  # its buffered tail may not fit either: it is thrown away
                shard.file.close()
            shard.path.unlink(missing_ok=True)
        self.open = {}


def write_manifest(root: Path, manifest: dict) -> None:
    """Atomically, then the directory fsynced too: the commit point of the shards renamed in before it."""
    atomic_write_bytes(root / MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}' is unreadable ({e}); delete '{root}' and prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a gptlab token dataset manifest; delete '{root}' and prepare it again")
    return manifest


def totals(shards: list[dict]) -> dict:
    """documents, tokens, UTF-8 bytes and shards per split (a one-document dataset's shard counts in both)."""
    out = {split: {"documents": 0, "tokens": 0, "bytes": 0, "shards": 0} for split in SPLITS}
    for shard in shards:
        for split, (tokens, n_bytes) in _shard_splits(shard).items():
            out[split]["tokens"] += tokens
            out[split]["bytes"] += n_bytes
            out[split]["shards"] += 1
        out[shard["split"] if "tail" not in shard else "train"]["documents"] += shard["documents"]
    return out


def _shard_splits(shard: dict) -> dict[str, tuple[int, int]]:
    """split -> (tokens, bytes) of one shard; a tail-split shard has both."""
    if "tail" not in shard:
        return {shard["split"]: (shard["tokens"], shard["bytes"])}
    tail, val_bytes = shard["tail"]
    return {"train": (tail, shard["bytes"] - val_bytes), "val": (shard["tokens"] - tail, val_bytes)}


@dataclass(frozen=True)
class TokenDataset:
    """A complete prepared dataset, memory-mapped: opening it costs the same at any size."""
    root: Path
    manifest: dict
    tokenizer: Tokenizer
    splits: dict[str, list[np.ndarray]]   # each split: its shards (or shard parts), as id arrays
    split_bytes: dict[str, int]           # UTF-8 bytes of each split's text: bits per byte
    identity: str                         # SHA-256 over the shards' hashes: what a resumed run checks


def open_dataset(root: str | Path) -> TokenDataset:
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"'{root}' is not a prepared dataset (no {MANIFEST}); make one with "
                                "python prepare_data.py --data FILES --name NAME")
    if manifest["state"] != "complete":
        raise ValueError(f"'{root}' is only partly prepared; finish it with the command that started it: "
                         f"{manifest.get('command') or 'python prepare_data.py ...'}")
    tokenizer = tokenizer_from_dict(manifest["tokenizer"])
    if tokenizer.fingerprint() != manifest["tokenizer_fingerprint"]:
        raise ValueError(f"'{root}': its tokenizer does not match the fingerprint it was prepared with; "
                         "delete the directory and prepare it again")
    splits: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    for shard in manifest["shards"]:
        path = root / shard["file"]
        size = path.stat().st_size if path.is_file() else -1
        if size != shard["tokens"] * dtype.itemsize:
            raise ValueError(f"'{path}' is {'missing' if size < 0 else f'{size:,} bytes'}, but the manifest records "
                             f"{shard['tokens']:,} tokens ({shard['tokens'] * dtype.itemsize:,} bytes); delete "
                             f"'{root}' and prepare it again")
        ids = np.memmap(path, dtype=dtype, mode="r")
        if "tail" in shard:
            splits["train"].append(ids[:shard["tail"][0]])
            splits["val"].append(ids[shard["tail"][0]:])
        else:
            splits[shard["split"]].append(ids)
    identity = hashlib.sha256(json.dumps([[s["sha256"], s.get("tail")] for s in manifest["shards"]]).encode())
    split_bytes = {split: manifest["totals"][split]["bytes"] for split in SPLITS}
    return TokenDataset(root, manifest, tokenizer, splits, split_bytes, identity.hexdigest())

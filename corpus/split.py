"""The held-out split, one rule for every kind of data: a document (or a prompt) is held out for
validation when its hash, read as a fraction of 2**64, is below val_fraction. The same text always
lands on the same side, whatever else the corpus holds: adding files never moves a document, and a
prompt in val is never trained on.

    held_out(record_digest(text.encode()), 0.1)   # a jsonl line's or parquet row's text, a pair's prompt
    held_out(bytes.fromhex(file_sha256), 0.1)     # a text file, by the SHA-256 of its bytes
"""

from __future__ import annotations

import hashlib


def record_digest(data: bytes) -> bytes:
    """BLAKE2b-64 of a document's (or a prompt's) UTF-8 bytes: the hash the rule reads."""
    return hashlib.blake2b(data, digest_size=8).digest()


def position(digest: bytes) -> int:
    """Where the digest falls in [0, 2**64): its first 8 bytes, big-endian."""
    return int.from_bytes(digest[:8], "big")


def held_out(digest: bytes, val_fraction: float) -> bool:
    """True (val) when the digest's position is below val_fraction of 2**64."""
    return position(digest) < val_fraction * 2**64

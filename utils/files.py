"""Atomic file writes and hashing: every write that matters goes through here.

A reader (another process, a crashed-and-restarted run, `inference.py` pointed at a live run) must
never see half a file, so each write goes to a temp file in the same directory, is fsynced, and is
swapped in with `os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator



@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` for the caller to write; on success it is fsynced and swapped in,
    on any error (a Ctrl-C included) it is removed, so no .tmp litter and no torn file stay."""
    path = Path(path)
    # Same directory as the target: os.replace is only atomic within one filesystem.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn mix."""
    with atomic_path(path) as tmp:
        # Not mkstemp: its 0600 mode would make caches and exports unreadable to other users; 0o666
        # lets the umask decide.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (keys in insertion order) with a trailing newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`, or {} if it is missing, unreadable, not JSON or not an object:
    for records whose absence or damage has a sensible default (a cache, a run's status)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


MAX_JSON_BYTES = 64 << 20  # a tokenizer.json of GPT-2's size is 1 MB; anything this big is not a file of ours


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> object:
    """Parsed JSON of a file someone may have handed us, bounded in size and depth, with one-line
    errors naming the file (FileNotFoundError if it is missing, ValueError otherwise)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"'{path}' is missing") from None
    if size > max_bytes:
        raise ValueError(f"{path} is {size / 1e6:.0f} MB, more than any file gptlab writes ({max_bytes >> 20} MB)")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0][:120]})") from None
    except RecursionError:
        raise ValueError(f"{path} nests too deeply to be a file gptlab wrote") from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints do not fill memory: the one way gptlab
    hashes a file (sources, token caches, checkpoints, exports)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def writable_dir(path: str | Path, flag: str) -> Path:
    """`path` as a directory this process can write into, created if missing; otherwise a ValueError
    in one line naming the directory and the flag that sets it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{flag} '{path}' is a file, not a directory; pass {flag} with a directory") from None
    except OSError as e:
        raise ValueError(f"cannot create {flag} directory '{path}': {e.strerror}; pass {flag} with a writable "
                         "directory") from None
    if not path.is_dir():
        raise ValueError(f"{flag} '{path}' is not a directory; pass {flag} with a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} directory '{path}' is not writable; pass {flag} with a writable directory")
    return path

"""One text (shakespeare, pydoc, a text file or a directory of them): reading it, its token cache, its
tail split. data.py turns it into a Corpus.

    source = load_text("shakespeare", "data")          # or "pydoc", or a path to a text file
    tok = build_tokenizer("char", source.text)
    cached = tokenize_cached(source.text, tok, "data")  # .ids, .text_sha256, .cache ("hit", "written", ...)
    splits = split_tokens(cached.ids, val_fraction=0.1, block_size=64)

The only files written are caches under data_dir, each atomically; a cached file is used only once
it has passed its check (the SHA-256 of a download; the length and SHA-256 recorded beside token
ids). Nothing here prints: the offline fallback's line comes back in TextSource.note.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from corpus.shards import token_dtype
from utils.files import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from tokenizer import Tokenizer


# Files that hold many documents: --data prepares them into a dataset rather than reading one text.
CORPUS_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
DATASET_NAMES = ("shakespeare", "pydoc")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 15
# Peak memory of reading and tokenizing a corpus, per byte of text: measured 8.0x (char) and 3.3x
# (gpt2) on a 50 MB file (ru_maxrss over the interpreter's baseline); rounded up for the margin.
TOKENIZE_BYTES_PER_BYTE = {"char": 10, "gpt2": 5}


@dataclass(frozen=True)
class TextSource:
    name: str  # "shakespeare", "pydoc", or the resolved path of the file or directory
    text: str
    note: str  # one line for the caller to print; "" when there is nothing to say



def load_text(spec: str, data_dir: str | Path) -> TextSource:
    """The corpus named by `spec`: a dataset name (shakespeare, pydoc) or a path.

    A name wins over a file of the same name in the working directory; write ./pydoc for the file.
    """
    if spec == "shakespeare":
        return _load_shakespeare(Path(data_dir))
    if spec == "pydoc":
        return TextSource("pydoc", pydoc_text(), "")
    return _load_path(Path(spec).expanduser())



def pydoc_text() -> str:
    """The documentation that ships with CPython (pydoc_data.topics), ~0.47 MB, deterministic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))



def _load_shakespeare(data_dir: Path) -> TextSource:
    path = data_dir / "shakespeare" / "input.txt"
    data = _read_if_hash_matches(path, SHAKESPEARE_SHA256)
    if data is None:
        data, reason = _download(SHAKESPEARE_URL, SHAKESPEARE_SHA256)
        if data is None:
            if path.exists():
                reason = f"the copy there failed its SHA-256 check; {reason}"
            note = (f"tiny shakespeare is not in {path.parent}/ and could not be downloaded ({reason}); "
                    "training on the built-in pydoc corpus instead. To use shakespeare: put input.txt in "
                    f"{path.parent}/ or pass --data PATH")
            return TextSource("pydoc", pydoc_text(), note)
        write_atomic(path, data)
    return TextSource("shakespeare", data.decode("utf-8"), "")



def _read_if_hash_matches(path: Path, sha256: str) -> bytes | None:
    """The file's bytes if it exists and has the expected hash; a damaged copy is not trusted."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data if hashlib.sha256(data).hexdigest() == sha256 else None



def _download(url: str, sha256: str) -> tuple[bytes | None, str]:
    """(bytes, "") on success, else (None, why not). Never raises for network trouble."""
    if os.environ.get("GPTLAB_OFFLINE") == "1":
        return None, "GPTLAB_OFFLINE=1"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        return None, f"download failed: {e}"
    if hashlib.sha256(data).hexdigest() != sha256:
        return None, f"the download from {url} does not have SHA-256 {sha256}"
    return data, ""



def _load_path(path: Path) -> TextSource:
    if not path.exists():
        raise FileNotFoundError(f"data path '{path}' does not exist; pass --data with a UTF-8 text file, "
                                f"a directory of .txt files, or one of: {', '.join(DATASET_NAMES)}")
    if path.is_dir():
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise ValueError(f"data directory '{path}' has no .txt files; put UTF-8 .txt files in it "
                             "(subdirectories count) or pass --data with a single text file")
        text = "\n\n".join(_read_utf8(f) for f in files)
    else:
        text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"data path '{path}' contains no text; pass --data with a non-empty corpus")
    return TextSource(str(path.resolve()), text, "")



def _read_utf8(path: Path) -> str:
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise become a vocabulary character.
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file '{path}' is not valid UTF-8 (byte {e.start}: {e.reason}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8 '{path}' > converted.txt") from None



def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write a data cache file atomically (utils/files.py); a cache that cannot be written (read-only,
    a file in the way, a full disk) is a one-line error naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ValueError(f"cannot write the data cache '{path}': {e.strerror or e}; pass --data-dir with a "
                         "writable directory that has room") from None



@dataclass(frozen=True)
class CachedTokens:
    ids: np.ndarray    # memory-mapped, read-only
    text_sha256: str   # the identity of the text they encode (a resumed run checks it)
    cache: str         # "hit", "written", or "rebuilt (why the cached ids were not trusted)"



def tokenize_cached(text: str, tokenizer: Tokenizer, data_dir: str | Path) -> CachedTokens:
    """Token ids of `text`, memory-mapped read-only from <data_dir>/tokens/.

    The file name is sha256(text hash + tokenizer fingerprint) plus the dtype, so a changed text or
    vocabulary never reads stale ids. Beside it, <name>.json records the count and SHA-256 of the
    ids, written after them: ids that do not match it (truncated, zeroed, bit-flipped) are rebuilt.
    """
    text_sha256 = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    key = hashlib.sha256(f"{text_sha256}:{tokenizer.fingerprint()}".encode()).hexdigest()
    dtype = token_dtype(tokenizer.vocab_size)
    path = Path(data_dir) / "tokens" / f"{key}.{dtype.name}.bin"
    problem = _cache_problem(path, dtype)
    if problem:
        ids = tokenizer.encode_array(text)
        if ids.size == 0:
            raise ValueError("the text encodes to no tokens; pass --data with a non-empty corpus")
        assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size, "tokenizer returned an id outside its vocabulary"
        data = memoryview(np.ascontiguousarray(ids, dtype=dtype)).cast("B")
        write_atomic(path, data)
        record = {"n_tokens": int(ids.size), "dtype": dtype.name, "sha256": hashlib.sha256(data).hexdigest()}
        write_atomic(_record_path(path), json.dumps(record).encode())
    cache = "hit" if not problem else "written" if problem == "absent" else f"rebuilt ({problem})"
    return CachedTokens(np.memmap(path, dtype=dtype, mode="r"), text_sha256, cache)



def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")



def _cache_problem(path: Path, dtype: np.dtype) -> str:
    """Why the cached ids at `path` cannot be used ("absent" if there are none), or "" if they can."""
    if not path.is_file():
        return "absent"
    try:
        record = json.loads(_record_path(path).read_text(encoding="utf-8"))
        n_tokens, digest = int(record["n_tokens"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "the cached ids had no readable record of their length and hash"
    if path.stat().st_size != n_tokens * dtype.itemsize:
        return f"the cached ids were {path.stat().st_size:,} bytes, not {n_tokens * dtype.itemsize:,}"
    if sha256_file(path) != digest:
        return "the cached ids did not match their SHA-256"
    return ""



def tokenizing_bytes(spec: str, tokenizer: str) -> tuple[int, int]:
    """(bytes of text, peak bytes of reading and tokenizing it) for a single text file read whole;
    (0, 0) for the named corpora (small) and for anything prepared (streamed, so bounded).
    utils/estimate.check_tokenizing_fits compares it with memory."""
    path = Path(spec).expanduser()
    if spec in DATASET_NAMES or not path.is_file() or path.name.endswith(CORPUS_FILE_SUFFIXES):
        return 0, 0
    size = path.stat().st_size
    return size, size * TOKENIZE_BYTES_PER_BYTE.get(tokenizer, max(TOKENIZE_BYTES_PER_BYTE.values()))



def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int) -> dict[str, np.ndarray]:
    """{"train": the head, "val": the last val_fraction of the tokens}, as views (no copy)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; 0.1 is usual")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    splits = {"train": tokens[:n_train], "val": tokens[n_train:]}
    for name, split in splits.items():
        if len(split) < block_size + 1:
            raise ValueError(
                f"the {name} split has {len(split)} tokens, fewer than block_size + 1 = {block_size + 1}: "
                "use a longer text, a smaller block_size, or a different val_fraction"
            )
    return splits

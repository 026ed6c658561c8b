"""Preparing a token dataset: corpus files -> shards of ids + manifest.json (corpus/shards.py has the format),
streamed, tokenized in parallel worker processes, resumable and appendable.

    result = prepare(["my_corpus/"], "data/tokens/web", DatasetSettings(tokenizer="gpt2"), workers=2)
    result.action      # "prepared", "continued", "appended" or "up to date"

Every document ends with the tokenizer's end-of-text id. Documents go to val when a hash of them, read
as a fraction of 2**64, is below val_fraction (a text file: its SHA-256; a jsonl line or parquet row:
BLAKE2b-64 of its UTF-8 text), so adding files never moves a document; a dataset of one document is
split by tokens instead (its tail is val), as a single text always was. The main process only reads
(corpus/documents.py); parsing, hashing and tokenizing happen in the workers (corpus/workers.py), whose
results come back in order. Shards are committed at document boundaries once about shard_tokens have
been written, and the manifest after them: a run stopped at any point (Ctrl-C, SIGKILL, a full disk)
continues from the last commit, and the shards come out byte-identical whatever the number of workers
and however often it was stopped.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from corpus.split import held_out
from corpus.workers import (HASH_IN_WORKER, WHOLE_FILE, Item, chars_task, default_workers, encode_task, init_worker,
                            ordered, texts_of)
from corpus.documents import file_kind, find_inputs, read_pieces
from corpus.shards import (FORMAT, MANIFEST, VERSION, ShardWriter, read_manifest, token_dtype, totals,
                    write_manifest)
from tokenizer import Tokenizer, build_tokenizer, check_vocab_fits, tokenizer_from_dict
from utils.files import atomic_write_bytes, sha256_file

TASK_CHARS = 1 << 22          # text per task sent to a worker (at most; less for small shards)
COMPRESSION = 4               # how much bigger than on disk a .gz/.zst file's text is counted
SPLIT_RULE = ("val when the document's hash / 2**64 < val_fraction; hash: a text file's SHA-256, a jsonl line's "
              "or parquet row's BLAKE2b-64 of its UTF-8 text (first 8 bytes, big-endian); one document only: "
              "its last val_fraction of tokens are val")


@dataclass(frozen=True)
class DatasetSettings:
    """What decides a dataset's tokens; a dataset is only ever extended with the same settings."""
    tokenizer: str = "gpt2"
    vocab_size: int = 8192              # bpe only
    tokenizer_train_bytes: int = 0      # bpe only: 0 = the whole corpus
    text_field: str = "text"
    val_fraction: float = 0.1

    def recorded(self) -> dict:
        keep = self.tokenizer == "bpe"
        return {k: v for k, v in dataclasses.asdict(self).items()
                if keep or k not in ("vocab_size", "tokenizer_train_bytes")}


@dataclass(frozen=True)
class Progress:
    source_bytes: int   # bytes of the source files read so far (this run)
    total_bytes: int    # bytes of the source files this run reads
    text_bytes: int     # UTF-8 bytes of text tokenized so far (this run)
    documents: int
    tokens: int
    seconds: float
    empty: int = 0      # documents (jsonl lines, parquet rows) whose text was null or empty: skipped


@dataclass(frozen=True)
class PrepareResult:
    manifest: dict
    action: str          # "up to date", "prepared", "continued" or "appended"
    progress: Progress   # this run's work


# --- workers: text -> ids, in parallel, in order ---


# --- reading the sources ---

@dataclass
class Task:
    pieces: list
    end: tuple[int, int]        # the cursor after this task: (source index, documents consumed in it)
    at_boundary: bool           # the task ends a document
    source_bytes: int           # source bytes consumed up to the end of this task


def _tasks(sources: list[dict], cursor: tuple[int, int], field: str, val_fraction: float,
           task_chars: int = TASK_CHARS) -> Iterator[Task]:
    """The work from `cursor` on, in tasks of about task_chars characters (files share tasks). A file
    smaller than a task goes whole, for a worker to read: this process then only hands out names. A
    bigger one is read here, in pieces (a text's, a jsonl line, a parquet batch), so that shards can
    be committed inside it; parsing, hashing and tokenizing are still the workers'."""
    pieces: list = []
    chars, base, end, last = 0, 0, cursor, True
    for i in range(cursor[0], len(sources)):
        path, size = sources[i]["path"], sources[i]["size"]
        kind = file_kind(Path(path))
        split = int(held_out(bytes.fromhex(sources[i]["sha256"]), val_fraction)) if kind == "text" else HASH_IN_WORKER
        skip = cursor[1] if i == cursor[0] else 0
        expanded = size * (COMPRESSION if path.endswith((".gz", ".zst")) else 1)
        if skip == 0 and expanded < task_chars:
            pieces.append(Item(WHOLE_FILE, split, True, path, 0))
            chars, end, last, offset = chars + expanded, (i + 1, 0), True, size
        else:
            for payload, index, last, offset in read_pieces(Path(path), field, skip):
                pieces.append(Item(payload, split, last, path, index))
                chars, end = chars + (payload.nbytes if kind == "parquet" else len(payload)), (i, index)
                if chars >= task_chars:
                    yield Task(pieces, end, last, base + offset)
                    pieces, chars = [], 0
        if chars >= task_chars:
            yield Task(pieces, end, last, base + offset)
            pieces, chars = [], 0
        base += size
    if pieces:
        yield Task(pieces, end, last, base)


def fingerprint_sources(files: list[Path], known: dict[str, dict]) -> list[dict]:
    """path, size, mtime and SHA-256 of each file; a file whose size and mtime match `known` keeps its
    recorded hash (re-running on an unchanged corpus must not re-read it)."""
    sources = []
    for path in files:
        try:
            stat = path.stat()
            old = known.get(str(path))
            if old and old["size"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns:
                digest = old["sha256"]
            else:
                digest = sha256_file(path)
        except OSError as e:
            raise ValueError(f"cannot read '{path}': {e.strerror or e}; check that it exists and is readable") from None
        sources.append({"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest})
    return sources


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One writer per dataset: a second prepare of the same one is refused, not interleaved."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"'{root}' is being prepared by another process; wait for it to finish") from None
        for stale in root.glob(".*.tmp"):  # what a killed run left
            stale.unlink(missing_ok=True)
        yield


# --- prepare ---


def prepare(specs: list[str], root: str | Path, settings: DatasetSettings, *, tokenizer: Tokenizer | None = None,
            workers: int = 0, shard_tokens: int = 100_000_000, command: str = "",
            progress: Callable[[Progress], None] | None = None) -> PrepareResult:
    """Prepare (or continue, or extend with new files) the dataset at `root` from the corpus files that
    `specs` name, with `tokenizer` (a fine-tuned model's) or one built from the corpus; unchanged
    inputs of a complete dataset cost a stat per file."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    workers = workers or default_workers()
    files = find_inputs(specs)
    root = Path(root)
    existed = (root / MANIFEST).is_file()
    try:
        with _locked(root):
            old = read_manifest(root)
            known = {s["path"]: s for s in old["sources"]} if old else {}
            sources = fingerprint_sources(files, known)
            if old:
                manifest, action = _extend(old, sources, settings, root, tokenizer)
            else:
                tokenizer = tokenizer or _build_tokenizer(sources, settings, workers)
                manifest, action = _new_manifest(root, sources, settings, tokenizer, command), "prepared"
                write_manifest(root, manifest)
            if manifest["state"] == "complete":
                return PrepareResult(manifest, action, Progress(0, 0, 0, 0, 0, 0.0))
            done = _tokenize(root, manifest, settings, workers, shard_tokens, progress)
            _finish(root, manifest, settings)
            return PrepareResult(manifest, action, done)
    except BaseException:
        # A new dataset that never committed a shard leaves nothing behind; one with shards stays, to continue.
        if not existed and not any(root.glob("shard_*.bin")):
            shutil.rmtree(root, ignore_errors=True)
        raise


def _new_manifest(root: Path, sources: list[dict], settings: DatasetSettings, tokenizer: Tokenizer,
                  command: str) -> dict:
    if tokenizer.eot_id is None:
        raise ValueError(f"this {tokenizer.name} tokenizer has no end-of-text id to end documents with (a char model "
                         "trained on one text); fine-tune it on a single text file, or train a new model on this data")
    if tokenizer.vocab_size > 2**32:
        raise ValueError(f"a vocabulary of {tokenizer.vocab_size:,} ids does not fit uint32 shards; "
                         "choose --vocab-size at most 2**32")
    record = tokenizer.to_dict()
    if hasattr(tokenizer, "hf_json"):
        atomic_write_bytes(root / "tokenizer.json", tokenizer.hf_json().encode("utf-8"))
    return {"format": FORMAT, "version": VERSION, "name": root.name, "state": "partial", "command": command,
            "settings": settings.recorded(), "split_rule": SPLIT_RULE,
            "tokenizer": record, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id, "dtype": token_dtype(tokenizer.vocab_size).name,
            "sources": sources, "cursor": [0, 0], "shards": [], "totals": totals([])}


def _extend(old: dict, sources: list[dict], settings: DatasetSettings, root: Path,
            tokenizer: Tokenizer | None) -> tuple[dict, str]:
    """The manifest to continue from: the same settings (and tokenizer, if one is given), every old
    source still there and unchanged; new sources are appended to the work."""
    if tokenizer is not None and tokenizer.fingerprint() != old["tokenizer_fingerprint"]:
        raise ValueError(f"'{root}' was prepared with another tokenizer ({old['tokenizer_fingerprint']}, not "
                         f"{tokenizer.fingerprint()}); pass another --name for a new dataset")
    if old["settings"] != settings.recorded():
        differ = ", ".join(f"{k} {old['settings'].get(k)!r} -> {v!r}" for k, v in settings.recorded().items()
                           if old["settings"].get(k) != v)
        raise ValueError(f"'{root}' was prepared with other settings ({differ}); use them again, or pass another "
                         "--name for a new dataset")
    now = {s["path"]: s for s in sources}
    for src in old["sources"]:
        new = now.get(src["path"])
        if new is None:
            raise ValueError(f"'{root}' was prepared from '{src['path']}', which is not among the inputs now; pass "
                             "it again (plus any new files), or pass another --name for a new dataset")
        if new["sha256"] != src["sha256"]:
            raise ValueError(f"'{src['path']}' changed since '{root}' was prepared from it (SHA-256 "
                             f"{src['sha256'][:12]}... -> {new['sha256'][:12]}...); restore it, or pass another "
                             "--name for a new dataset")
    added = [s for s in sources if s["path"] not in {o["path"] for o in old["sources"]}]
    manifest = dict(old, sources=[now[s["path"]] for s in old["sources"]] + added)
    if not added:
        return manifest, "up to date" if old["state"] == "complete" else "continued"
    if old["state"] == "complete":
        manifest.update(state="partial", cursor=[len(old["sources"]), 0])
        _check_tokenizer_covers(manifest, added, settings)
    return manifest, "appended"


def _check_tokenizer_covers(manifest: dict, added: list[dict], settings: DatasetSettings) -> None:
    """A char vocabulary is fixed once built: new files may not bring new characters."""
    if manifest["tokenizer"].get("type") != "char":
        return
    chars = _corpus_chars(added, settings, 1)
    new = sorted(chars - set(manifest["tokenizer"]["chars"]))
    if new:
        raise ValueError(f"the new files hold {len(new)} characters outside this char dataset's vocabulary "
                         f"({''.join(new[:20])!r}); prepare all files into a new --name")


def _corpus_chars(sources: list[dict], settings: DatasetSettings, workers: int) -> set[str]:
    """Every character of the sources: a streaming pass, in parallel."""
    tasks = (task.pieces for task in _tasks(sources, (0, 0), settings.text_field, 0.0))
    return set().union(*ordered(chars_task, tasks, workers, (None, "uint16", 0.0, settings.text_field)))


def _build_tokenizer(sources: list[dict], settings: DatasetSettings, workers: int) -> Tokenizer:
    """char: a parallel pass for the character set; bpe: trained on the first tokenizer_train_bytes."""
    if settings.tokenizer == "char":
        chars = _corpus_chars(sources, settings, workers)
        if not chars:
            raise ValueError("the corpus holds no text (every file or line is empty); pass --data with files "
                             "that have some")
        texts: Iterator[str] | list[str] = ["".join(sorted(chars))]
    else:
        expanded = sum(s["size"] * (COMPRESSION if s["path"].endswith((".gz", ".zst", ".parquet")) else 1)
                       for s in sources)  # at most this much text: a generous bound
        check_vocab_fits(settings.tokenizer, settings.vocab_size, min(settings.tokenizer_train_bytes or expanded,
                                                                      expanded))
        texts = _training_sample(sources, settings)
    return build_tokenizer(settings.tokenizer, texts, vocab_size=settings.vocab_size, end_of_text=True)


def _training_sample(sources: list[dict], settings: DatasetSettings) -> Iterator[str]:
    """The documents (text pieces) in order, up to tokenizer_train_bytes of them (0: all)."""
    budget = settings.tokenizer_train_bytes or float("inf")
    init_worker(None, "uint16", 0.0, settings.text_field)
    for task in _tasks(sources, (0, 0), settings.text_field, 0.0):
        for text, *_ in texts_of(task.pieces):
            if not text:
                continue
            yield text
            budget -= len(text.encode("utf-8", "surrogatepass"))
            if budget <= 0:
                return


def _tokenize(root: Path, manifest: dict, settings: DatasetSettings, workers: int, shard_tokens: int,
              progress: Callable[[Progress], None] | None) -> Progress:
    """Tokenize from the cursor on, committing shards + manifest at document boundaries."""
    dtype = np.dtype(manifest["dtype"])
    writer = ShardWriter(root, dtype)
    cursor = tuple(manifest["cursor"])
    total = sum(s["size"] for s in manifest["sources"][cursor[0]:])
    start, text_bytes, documents, tokens, source_bytes, empty = time.perf_counter(), 0, 0, 0, 0, 0
    initargs = (manifest["tokenizer"], dtype.name, settings.val_fraction, settings.text_field)
    # Shards are committed between tasks: tasks of at most a shard's worth of text keep shards near size.
    tasks = _tasks(manifest["sources"], cursor, settings.text_field, settings.val_fraction,
                   min(TASK_CHARS, max(shard_tokens, 1024)))
    ends: collections.deque = collections.deque()
    try:
        with contextlib.closing(ordered(encode_task, _remember(tasks, ends), workers, initargs)) as results:
            for ids, counts, splits, n_bytes, last, skipped in results:
                task, empty = ends.popleft(), empty + skipped
                per_piece = np.repeat(splits, counts)
                for split in (0, 1):
                    mine = splits == split
                    writer.write(split, ids[per_piece == split], int((last & mine).sum()), int(n_bytes[mine].sum()))
                text_bytes, tokens = text_bytes + int(n_bytes.sum()), tokens + len(ids)
                documents, source_bytes = documents + int(last.sum()), task.source_bytes
                if task.at_boundary and writer.tokens >= shard_tokens:
                    _commit(root, manifest, writer, task.end)
                if progress:
                    progress(Progress(source_bytes, total, text_bytes, documents, tokens, time.perf_counter() - start,
                                      empty))
        _commit(root, manifest, writer, (len(manifest["sources"]), 0))
    except OSError as e:
        raise ValueError(f"cannot write the dataset '{root}': {e.strerror or e}; free some space (or fix the "
                         "permissions) and run the same command again: it continues from the last shard") from None
    finally:
        writer.discard()
    return Progress(source_bytes, total, text_bytes, documents, tokens, time.perf_counter() - start, empty)


def _remember(tasks: Iterator[Task], ends: collections.deque) -> Iterator[list]:
    """The tasks' pieces for the workers; each Task is kept (in order) for when its result comes back."""
    for task in tasks:
        ends.append(task)
        yield task.pieces


def _commit(root: Path, manifest: dict, writer: ShardWriter, cursor: tuple[int, int]) -> None:
    """Commit the shards written since the last commit, up to `cursor`, once the sources they were read
    from are checked to be what the manifest records."""
    _check_unchanged(manifest["sources"][manifest["cursor"][0]:cursor[0] + 1])
    manifest["shards"] += writer.commit(len(manifest["shards"]))
    manifest.update(cursor=list(cursor), totals=totals(manifest["shards"]))
    write_manifest(root, manifest)


def _check_unchanged(sources: list[dict]) -> None:
    """The manifest records each source's size, mtime and SHA-256 from before it was read: a file that was
    written to meanwhile (truncated, appended, replaced) no longer matches them, and what was read from
    it is not committed."""
    for src in sources:
        try:
            stat = os.stat(src["path"])
        except OSError as e:
            raise ValueError(f"'{src['path']}' went away while it was being read ({e.strerror or e}); restore it "
                             "and run the same command again: it continues from the last shard") from None
        if (stat.st_size, stat.st_mtime_ns) != (src["size"], src["mtime_ns"]):
            raise ValueError(f"'{src['path']}' changed while it was being read ({src['size']:,} bytes -> "
                             f"{stat.st_size:,}); nothing read from it was kept. Let whatever writes it finish, then "
                             "run the same command again")


def _finish(root: Path, manifest: dict, settings: DatasetSettings) -> None:
    """Mark it complete; a one-document dataset gets the tail split a single text always had."""
    shards = manifest["shards"]
    if not shards:
        raise ValueError(f"the corpus for '{root}' holds no documents (every file or line is empty); pass --data "
                         "with files that have text")
    if sum(s["documents"] for s in shards) == 1 and len(shards) == 1 and "tail" not in shards[0]:
        shard = shards[0]
        tail = int(shard["tokens"] * (1.0 - settings.val_fraction))
        ids = np.memmap(root / shard["file"], dtype=manifest["dtype"], mode="r")
        tokenizer = tokenizer_from_dict(manifest["tokenizer"])
        step, val_bytes = 1 << 20, 0
        for i in range(tail, len(ids), step):  # in chunks: the tail of a big text need not fit in memory
            chunk = ids[i:i + step]
            val_bytes += len(tokenizer.decode(chunk[chunk != tokenizer.eot_id]).encode("utf-8", "surrogatepass"))
        shard["tail"] = [tail, val_bytes]
    manifest.update(state="complete", totals=totals(shards))
    write_manifest(root, manifest)



"""Data: what --data names, as a Corpus of train/val splits; one text's cache. (Batches: batches.py.)

    corpus = prepare_corpus(cfg)           # as train.py uses it: one text, a prepared dataset, or pairs
    x, y = get_batch(corpus.splits["train"], 12, 64, seed=1337, step=0)   # batches.py: (B, T) int64 each

One text (shakespeare, pydoc, a text file) goes through the steps below, is cached and split at its
tail; prompt/response pairs (a .jsonl of {"prompt", "response"} lines, or a task of tasks.py by name)
become rows with a loss mask (pairs.py); anything else (a directory, globs, jsonl, parquet, a dataset's
name) is a sharded dataset that dataset.py prepares and shards.py opens:

    source = load_text("shakespeare", "data")          # or "pydoc", or a path to a text file
    tok = build_tokenizer("char", source.text)
    cached = tokenize_cached(source.text, tok, "data")  # .ids, .text_sha256, .cache ("hit", "written", ...)
    splits = split_tokens(cached.ids, val_fraction=0.1, block_size=64)

Nothing here prints: a line the user should see (the offline fallback) comes back in Corpus.note, and
a dataset's preparation reports to the `progress` callback. The only files written are caches under
data_dir, each atomically; a cached file is used only once it has passed its check (the SHA-256 of a
download; the length and SHA-256 recorded beside token ids).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np


from pairs import PackedRows
from shards import atomic_write_bytes, token_dtype
from parameters import ModelConfig

if TYPE_CHECKING:
    from tokenizer import Tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DOWNLOAD_TIMEOUT_S = 15
DATASET_NAMES = ("shakespeare", "pydoc")
# Files that hold many documents: --data prepares them into a dataset rather than reading one text.
CORPUS_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
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
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != digest:
            return "the cached ids did not match their SHA-256"
    return ""


@dataclass(frozen=True)
class Corpus:
    """What training reads: the tokenizer and the train/val splits of its ids, each split a list of
    arrays (one for a single text; a prepared dataset's shards) or, for pairs, PackedRows, with the UTF-8
    sizes of what their targets encode, for bits per byte."""
    name: str                             # shakespeare, pydoc, a text file's path, or a dataset's directory
    tokenizer: Tokenizer
    splits: dict[str, list[np.ndarray] | PackedRows]
    split_bytes: dict[str, int]
    sha256: str                           # the identity of the data: the text's SHA-256, or the dataset's
    kind: str                             # "text" (one text, one array), "dataset" (prepared shards) or "pairs"
    summary: str                          # one line for the console: what was read
    first_text: str                       # the data's first character(s): a prompt its vocabulary can encode
    note: str = ""                        # one line for the console (e.g. the offline fallback), or ""
    settings: dict = field(default_factory=dict)  # a dataset's: the config values its tokens were made with

    @property
    def identity(self) -> dict[str, str]:
        """What a checkpoint records, so that a resume on other data is refused."""
        return {"source": self.name, "sha256": self.sha256, "kind": self.kind}

    def bits_per_byte(self, split: str, loss: float) -> float:
        """A mean loss (nats per token) on `split` as bits per UTF-8 byte of its text: comparable across
        tokenizers. Eval windows are drawn uniformly over the split's tokens, so tokens/bytes of the
        whole split is the expected ratio of the windows too (for pairs: trained targets / their bytes)."""
        data = self.splits[split]
        tokens = data.total_targets if isinstance(data, PackedRows) else sum(len(s) for s in data)
        return loss / math.log(2) * tokens / max(self.split_bytes[split], 1)


def prepare_corpus(cfg: ModelConfig, tokenizer: Tokenizer | None = None, recorded: dict | None = None,
                   progress: Callable | None = None, open_only: bool = False) -> Corpus:
    """The data --data names, tokenized: a single text (shakespeare, pydoc, one text file) as one cached
    array with a tail split; anything else (a directory, globs, jsonl, parquet) prepared once into a
    sharded dataset under data_dir/tokens/ (progress gets its Progress), or a prepared dataset opened.
    `tokenizer` is a resumed or fine-tuned model's; `recorded` a resumed run's data identity;
    open_only: another process (DDP's rank 0) has prepared it already."""
    kind, target = resolve_data(cfg.data, cfg.data_dir)
    if kind == "directory" and recorded and "kind" not in recorded:
        kind = "text"  # a run from before datasets existed read a directory as one text; it resumes so
    if kind == "text":
        return _text_corpus(cfg, tokenizer)
    if kind == "pairs":
        from tasks import TASKS

        if cfg.data in TASKS and not Path(cfg.data).exists():
            return _pairs_corpus(cfg, tokenizer, target, *ensure_task(cfg.data, target))
        return _pairs_corpus(cfg, tokenizer, target, target.read_bytes())
    from dataset import DatasetSettings, prepare
    from shards import open_dataset

    note = ""
    if kind != "dataset":
        settings = DatasetSettings(cfg.tokenizer, cfg.vocab_size, cfg.tokenizer_train_bytes, cfg.text_field,
                                   cfg.val_fraction)
        target = auto_dataset_dir(cfg.data, cfg.data_dir, settings, tokenizer)
        if not open_only:
            result = prepare([cfg.data], target, settings, tokenizer=tokenizer, progress=progress,
                             command=f"python train.py --data {cfg.data} (prepared into {target})")
            if result.progress.empty:
                note = (f"{result.progress.empty:,} documents (jsonl lines or parquet rows) had a null or empty "
                        f"{cfg.text_field!r} and were skipped")
    ds = open_dataset(target)
    if tokenizer is not None and tokenizer.fingerprint() != ds.tokenizer.fingerprint():
        raise ValueError(f"the dataset '{target}' was tokenized with {ds.tokenizer.name} "
                         f"({ds.tokenizer.fingerprint()}), but the model uses {tokenizer.name} "
                         f"({tokenizer.fingerprint()}); prepare the data with the model's tokenizer or train anew")
    totals = ds.manifest["totals"]
    summary = (f"data {ds.root}: prepared dataset, {sum(t['documents'] for t in totals.values()):,} documents, "
               f"{totals['train']['tokens']:,} train + {totals['val']['tokens']:,} val {ds.tokenizer.name} tokens "
               f"in {len(ds.manifest['shards'])} shards (vocab {ds.tokenizer.vocab_size:,})")
    n_docs = sum(t["documents"] for t in totals.values())
    for split, arrays in ds.splits.items():
        if not totals[split]["tokens"]:
            vf = ds.manifest["settings"]["val_fraction"]
            raise ValueError(f"no document of '{ds.root}' landed in the {split} split: whole documents are held out "
                             f"by a hash of their text, each with chance val_fraction {vf:g}, and {n_docs:,} documents "
                             f"left it empty (about {n_docs * (vf if split == 'val' else 1 - vf):.1f} expected); add "
                             "documents, or pass another --val-fraction")
        if not any(len(a) > cfg.block_size for a in arrays):
            raise ValueError(f"the {split} split of '{ds.root}' has no shard longer than block_size + 1 = "
                             f"{cfg.block_size + 1} tokens: use more documents, a smaller block_size, or "
                             "prepare it with another val_fraction")
    first = next(a for a in ds.splits["train"] if len(a))[:1]
    settings = {"tokenizer": ds.tokenizer.name, **ds.manifest["settings"],
                **(learned_vocab(ds.tokenizer) if tokenizer is None else {})}
    return Corpus(str(ds.root), ds.tokenizer, ds.splits, ds.split_bytes, ds.identity, "dataset", summary,
                  ds.tokenizer.decode(first), note, settings=settings)


def _text_corpus(cfg: ModelConfig, tokenizer: Tokenizer | None) -> Corpus:
    """One text -> tokenizer (built from it unless given) -> cached ids -> a tail split."""
    from tokenizer import build_tokenizer, check_vocab_fits

    source = load_text(cfg.data, cfg.data_dir)
    text_bytes = len(source.text.encode("utf-8", "surrogatepass"))
    learned = tokenizer is None
    if learned:
        check_vocab_fits(cfg.tokenizer, cfg.vocab_size, text_bytes)
        tokenizer = build_tokenizer(cfg.tokenizer, source.text, vocab_size=cfg.vocab_size)
    cached = tokenize_cached(source.text, tokenizer, cfg.data_dir)
    splits = split_tokens(cached.ids, cfg.val_fraction, cfg.block_size)
    val_bytes = len(tokenizer.decode(splits["val"]).encode("utf-8", "surrogatepass"))
    summary = (f"data {source.name}: {len(source.text):,} characters -> {len(cached.ids):,} {tokenizer.name} tokens "
               f"(vocab {tokenizer.vocab_size:,}; token cache {cached.cache})")
    return Corpus(source.name, tokenizer, {k: [v] for k, v in splits.items()},
                  {"train": text_bytes - val_bytes, "val": val_bytes}, cached.text_sha256, "text", summary,
                  source.text[0], source.note, settings=learned_vocab(tokenizer) if learned else {})


def learned_vocab(tokenizer: Tokenizer) -> dict:
    """The real size of a bpe tokenizer learned from this corpus, which a small corpus leaves below the
    vocab_size asked: the run records it (train.py's adopt_dataset_settings says so). Other tokenizers'
    sizes are not a config value."""
    return {"vocab_size": tokenizer.vocab_size} if tokenizer.name == "bpe" else {}


def ensure_task(name: str, path: Path) -> tuple[bytes, str]:
    """(the bytes of task `name`'s .jsonl, a note or ""): written to path unless the file there already
    holds exactly them; one from an older tasks.py is written again, with a note."""
    from tasks import task_bytes

    data = task_bytes(name)
    if path.is_file() and path.read_bytes() == data:
        return data, ""
    replaced = path.exists()
    write_atomic(path, data)
    return data, f"{path} differed from what tasks.py generates for {name}: written again" if replaced else ""


def _pairs_corpus(cfg: ModelConfig, tokenizer: Tokenizer | None, path: Path, data: bytes, note: str = "") -> Corpus:
    """Prompt/response pairs (the file's bytes) -> held-out split by prompt -> tokenizer (built from them
    unless given; given one without an end-of-text id gains one) -> rows whose targets are the responses."""
    from pairs import encode_pairs, pack, read_pairs, split_pairs, trained_text_bytes, with_end_of_text
    from tokenizer import build_tokenizer, check_vocab_fits

    pairs, notes, learned = read_pairs(path, data), [note], tokenizer is None
    if learned:
        check_vocab_fits(cfg.tokenizer, cfg.vocab_size, len(data))
        texts = (text for pair in pairs for text in (pair.prompt, pair.response))
        tokenizer = build_tokenizer(cfg.tokenizer, texts, vocab_size=cfg.vocab_size, end_of_text=True)
    elif tokenizer.eot_id is None:
        tokenizer, grown = with_end_of_text(tokenizer)
        notes.append(grown)
    splits, split_bytes = {}, {}
    for split, part in split_pairs(pairs, cfg.val_fraction).items():
        examples = encode_pairs(part, tokenizer, path)
        splits[split] = pack(examples, cfg.block_size, tokenizer.eot_id, cfg.loss_on_prompt, cfg.pack_pairs)
        split_bytes[split] = trained_text_bytes(part, cfg.loss_on_prompt)
    cut, dropped = (sum(getattr(r, k) for r in splits.values()) for k in ("truncated", "dropped"))
    if cut:
        dropped_note = f"; {dropped:,} had no response left and were dropped" if dropped else ""
        notes.append(f"{cut:,} of {len(pairs):,} pairs are longer than block_size + 1 = {cfg.block_size + 1} tokens "
                     f"and were cut to it, losing the end of their response{dropped_note}; raise block_size to keep "
                     "them whole")
    train, val = splits["train"], splits["val"]
    summary = (f"data {path}: {len(pairs):,} prompt/response pairs ({len(train.examples):,} train, "
               f"{len(val.examples):,} held-out val prompts) -> {len(train) + len(val):,} rows of {cfg.block_size + 1} "
               f"tokens{' (packed)' if cfg.pack_pairs else ''}; loss on the {'prompts and ' if cfg.loss_on_prompt else ''}"
               f"responses: {train.total_targets:,} train targets ({tokenizer.name}, vocab {tokenizer.vocab_size:,})")
    return Corpus(str(path), tokenizer, splits, split_bytes, hashlib.sha256(data).hexdigest(), "pairs", summary,
                  tokenizer.decode(val.examples[0].prompt), "\n".join(filter(None, notes)),
                  settings=learned_vocab(tokenizer) if learned else {})


def resolve_data(spec: str, data_dir: str | Path) -> tuple[str, Path | None]:
    """What --data names: ("text", None) for shakespeare, pydoc or one text file; ("pairs", file) for a
    .jsonl of prompt/response pairs or a generated task's (tasks.py: data_dir/tasks/<name>.jsonl, which
    prepare_corpus writes when it is missing or differs); ("dataset", dir) for a prepared dataset (its directory, or a name under data_dir/tokens/);
    ("directory" | "files", None) for corpus files that are prepared into a dataset first."""
    from pairs import looks_like_pairs
    from tasks import TASKS, task_path

    path = Path(spec).expanduser()
    if spec in DATASET_NAMES:
        return "text", None
    if spec in TASKS and not path.exists():
        return "pairs", task_path(spec, data_dir)
    if looks_like_pairs(path):
        return "pairs", path
    for candidate in (path, Path(data_dir) / "tokens" / spec):
        if (candidate / "manifest.json").is_file():
            return "dataset", candidate
    if path.is_dir():
        return "directory", None
    if path.is_file() and not path.name.endswith(CORPUS_FILE_SUFFIXES):
        return "text", None
    if path.exists() or any(c in spec for c in "*?["):
        return "files", None
    raise FileNotFoundError(f"data path '{path}' does not exist; pass --data with a UTF-8 text file, a directory, "
                            f"a glob, .jsonl/.parquet files, a prepared dataset's name, or one of: "
                            f"{', '.join(DATASET_NAMES + tuple(TASKS))}")


def auto_dataset_dir(spec: str, data_dir: str | Path, settings, tokenizer: Tokenizer | None) -> Path:
    """data_dir/tokens/<stem>-<tokenizer>-<hash>: the same files and settings always map to the same
    dataset, so the second run on them opens it (a stat per file) instead of preparing it again."""
    key = json.dumps([str(Path(spec).expanduser().resolve()), settings.recorded(),
                      tokenizer.fingerprint() if tokenizer else None])
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(spec).name.split(".")[0])[:40] or "corpus"
    return Path(data_dir) / "tokens" / f"{stem}-{settings.tokenizer}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def tokenizing_bytes(spec: str, tokenizer: str) -> tuple[int, int]:
    """(bytes of text, peak bytes of reading and tokenizing it) for a single text file read whole;
    (0, 0) for the named corpora (small) and for anything prepared (streamed, so bounded).
    utils/estimate.check_tokenizing_fits compares it with memory."""
    path = Path(spec).expanduser()
    if spec in DATASET_NAMES or not path.is_file() or path.name.endswith(CORPUS_FILE_SUFFIXES):
        return 0, 0
    size = path.stat().st_size
    return size, size * TOKENIZE_BYTES_PER_BYTE.get(tokenizer, max(TOKENIZE_BYTES_PER_BYTE.values()))


def check_same_corpus(recorded: dict | None, corpus: Corpus) -> None:
    """A resumed run must read the data it was trained on; checkpoints from before this record pass."""
    if recorded and recorded.get("sha256") != corpus.sha256:
        raise ValueError(f"the data changed since this run was trained: {corpus.name} now has SHA-256 "
                         f"{corpus.sha256[:12]}..., but the run trained on {recorded.get('source')} with "
                         f"{str(recorded.get('sha256'))[:12]}...; restore that data, or fine-tune on the new one "
                         "with --init-from RUN")


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

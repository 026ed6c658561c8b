"""Data: what --data names, as a Corpus of train/val splits (batches: training/batches.py).

    corpus = prepare_corpus(cfg)           # as train.py uses it: one text, a prepared dataset, or pairs
    corpus.tokenizer, corpus.splits["train"], corpus.bits_per_byte("val", loss)

One text (shakespeare, pydoc, a text file) is read, cached and split at its tail (corpus/text.py);
prompt/response pairs (a .jsonl of {"prompt", "response"} lines, or a task of corpus/tasks.py by name)
become rows with a loss mask (corpus/pairs.py); anything else (a directory, globs, jsonl, parquet, a
dataset's name) is a sharded dataset that corpus/prepare.py prepares and corpus/shards.py opens.
The corpus decides the tokenizer (or adopts the model's), so the model is built once, after it.

Nothing here prints: a line the user should see (the offline fallback) comes back in Corpus.note, and
a dataset's preparation reports to the `progress` callback.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from corpus.pairs import PackedRows
from corpus.text import CORPUS_FILE_SUFFIXES, DATASET_NAMES, load_text, split_tokens, tokenize_cached, write_atomic
from parameters import ModelConfig

if TYPE_CHECKING:
    from tokenizer import Tokenizer


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
        """A mean loss (nats per token) on `split` in bits per UTF-8 byte of its text. Eval windows are
        drawn uniformly over the split's tokens, so tokens/bytes of the whole split is the expected ratio
        of the windows too (for pairs: trained targets / their bytes)."""
        data = self.splits[split]
        tokens = data.total_targets if isinstance(data, PackedRows) else sum(len(s) for s in data)
        return bits_per_byte(loss, tokens, self.split_bytes[split])


def bits_per_byte(nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """A mean loss in nats per token as bits per UTF-8 byte of the text those tokens encode: comparable
    across tokenizers (training's evals and every score of evaluation/ use it)."""
    return nats_per_token / math.log(2) * tokens / max(text_bytes, 1)


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
        from corpus.tasks import TASKS

        if cfg.data in TASKS and not Path(cfg.data).exists():
            notes: list[str] = []
            return _pairs_corpus(cfg, tokenizer, target, ensure_task(cfg.data, target, notes), notes)
        return _pairs_corpus(cfg, tokenizer, target, target.read_bytes(), [])
    from corpus.prepare import DatasetSettings, prepare
    from corpus.shards import open_dataset

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


def ensure_task(name: str, path: Path, notes: list[str]) -> bytes:
    """The bytes of task `name`'s .jsonl: written to path unless the file there already holds exactly them;
    one from an older corpus/tasks.py is written again, and notes say so."""
    from corpus.tasks import task_bytes

    data = task_bytes(name)
    if path.is_file() and path.read_bytes() == data:
        return data
    if path.exists():
        notes.append(f"{path} differed from what tasks.py generates for {name}: written again")
    write_atomic(path, data)
    return data


def _pairs_corpus(cfg: ModelConfig, tokenizer: Tokenizer | None, path: Path, data: bytes, notes: list[str]) -> Corpus:
    """Prompt/response pairs (the file's bytes) -> held-out split by prompt -> tokenizer (built from them
    unless given; given one without an end-of-text id gains one) -> rows whose targets are the responses."""
    from corpus.pairs import encode_pairs, pack, read_pairs, split_pairs, trained_text_bytes, with_end_of_text
    from tokenizer import build_tokenizer, check_vocab_fits

    pairs, learned = read_pairs(path, data), tokenizer is None
    if learned:
        check_vocab_fits(cfg.tokenizer, cfg.vocab_size, len(data))
        texts = (text for pair in pairs for text in (pair.prompt, pair.response))
        tokenizer = build_tokenizer(cfg.tokenizer, texts, vocab_size=cfg.vocab_size, end_of_text=True)
    elif tokenizer.eot_id is None:
        tokenizer = with_end_of_text(tokenizer, notes)
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


class DataSource(NamedTuple):
    """What --data names, before anything is read."""
    kind: str            # "text" (one text), "pairs", "dataset" (prepared), "directory" or "files" (to prepare)
    path: Path | None    # the pairs file or the dataset's directory; None for the others


def resolve_data(spec: str, data_dir: str | Path) -> DataSource:
    """What --data names: ("text", None) for shakespeare, pydoc or one text file; ("pairs", file) for a
    .jsonl of prompt/response pairs or a generated task's (corpus/tasks.py: data_dir/tasks/<name>.jsonl, which
    prepare_corpus writes when it is missing or differs); ("dataset", dir) for a prepared dataset (its directory, or a name under data_dir/tokens/);
    ("directory" | "files", None) for corpus files that are prepared into a dataset first."""
    from corpus.pairs import looks_like_pairs
    from corpus.tasks import TASKS, task_path

    path = Path(spec).expanduser()
    if spec in DATASET_NAMES:
        return DataSource("text", None)
    if spec in TASKS and not path.exists():
        return DataSource("pairs", task_path(spec, data_dir))
    if looks_like_pairs(path):
        return DataSource("pairs", path)
    for candidate in (path, Path(data_dir) / "tokens" / spec):
        if (candidate / "manifest.json").is_file():
            return DataSource("dataset", candidate)
    if path.is_dir():
        return DataSource("directory", None)
    if path.is_file() and not path.name.endswith(CORPUS_FILE_SUFFIXES):
        return DataSource("text", None)
    if path.exists() or any(c in spec for c in "*?["):
        return DataSource("files", None)
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


def check_same_corpus(recorded: dict | None, corpus: Corpus) -> None:
    """A resumed run must read the data it was trained on; checkpoints from before this record pass."""
    if recorded and recorded.get("sha256") != corpus.sha256:
        raise ValueError(f"the data changed since this run was trained: {corpus.name} now has SHA-256 "
                         f"{corpus.sha256[:12]}..., but the run trained on {recorded.get('source')} with "
                         f"{str(recorded.get('sha256'))[:12]}...; restore that data, or fine-tune on the new one "
                         "with --init-from RUN")



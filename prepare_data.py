"""Prepare a corpus once into a sharded token dataset that any number of runs then train on.

    python prepare_data.py --data my_corpus/ --tokenizer gpt2 --name web       # -> data/tokens/web/
    python prepare_data.py --data 'fineweb/*.parquet' --tokenizer bpe --vocab-size 32768 --name fw
    python train.py --config gpt2_small --data web                            # train on it

Inputs: .txt/.md files (one document each), .jsonl/.jsonl.gz/.jsonl.zst (a document per line, its
--text-field) and .parquet (a document per row), given as files, directories or globs. Every document
ends with the tokenizer's end-of-text id; whole documents go to val by a hash of their text. Memory
stays bounded at any corpus size, workers tokenize in parallel, and the shards are the same whatever
their number. Stopped (Ctrl-C, a kill, a full disk)? Run the same command again: it continues. Run
it again later with more files: they are appended; with nothing new it does nothing. corpus/prepare.py has
the format; this stage parses, reports progress and prints the summary.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from config import Parser, add_fields
from corpus.prepare import DatasetSettings, PrepareResult, default_workers, prepare
from parameters import ModelConfig
from tokenizer import TOKENIZERS
from utils.cli import run_main
from utils.console import ProgressLine, format_duration
from utils.signals import GracefulStop

SHARED = ("tokenizer", "vocab_size", "tokenizer_train_bytes", "text_field", "val_fraction", "data_dir")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="corpus files, directories (searched recursively) or globs")
    parser.add_argument("--name", help="the dataset's name: data_dir/tokens/NAME (default: the first input's name "
                                       "and the tokenizer, e.g. my_corpus-gpt2)")
    add_fields(parser, SHARED)  # the training config's own keys: the same help, defaults and checks
    parser.add_argument("--shard-tokens", "--shard_tokens", type=int, default=100_000_000,
                        help="tokens per shard, about (default 100000000)")
    parser.add_argument("--workers", type=int, default=0,
                        help=f"tokenizing processes (default 0 = the cores this process may use: {default_workers()})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = ModelConfig(**{key: getattr(args, key) for key in SHARED}).validate()
    TOKENIZERS.lookup(cfg.tokenizer)  # an unknown name: one line, with the closest registered one
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0 = one per core), got {args.workers}")
    name = args.name or default_name(args.data[0], cfg.tokenizer)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--name {name!r} must be a plain directory name (no '/', not starting with '.')")
    root = Path(cfg.data_dir) / "tokens" / name
    settings = DatasetSettings(cfg.tokenizer, cfg.vocab_size, cfg.tokenizer_train_bytes, cfg.text_field,
                               cfg.val_fraction)
    progress = ProgressLine(f"preparing {root}")
    command = shlex.join(["python", "prepare_data.py", *(sys.argv[1:] if argv is None else argv)])
    # Ctrl-C and SIGTERM stop at once, with one line (exit 130 / 143); the workers are stopped with it.
    again = "while preparing; run the same command again: it continues from the last shard"
    try:
        with GracefulStop(immediate=True, during=again):
            result = prepare(args.data, root, settings, workers=args.workers, shard_tokens=args.shard_tokens,
                             command=command, progress=progress)
    finally:
        progress.close()
    print(summary(root, result))
    return 0


def default_name(first_input: str, tokenizer: str) -> str:
    stem = Path(first_input.rstrip("/")).name.split(".")[0].replace("*", "") or "corpus"
    return f"{stem}-{tokenizer}"


def summary(root: Path, result: PrepareResult) -> str:
    """A table of the dataset's splits, this run's work, and the command that trains on it."""
    m, p = result.manifest, result.progress
    rows = [f"{'split':<6} {'documents':>12} {'tokens':>15} {'text bytes':>16} {'shards':>7} {'bytes/token':>12}"]
    for split, t in m["totals"].items():
        rows.append(f"{split:<6} {t['documents']:>12,} {t['tokens']:>15,} {t['bytes']:>16,} {t['shards']:>7} "
                    f"{t['bytes'] / max(t['tokens'], 1):>12.3f}")
    work = (f"this run: {p.text_bytes / 1e6:,.1f} MB of text, {p.documents:,} documents, {p.tokens:,} tokens in "
            f"{format_duration(p.seconds)} ({p.text_bytes / 1e6 / max(p.seconds, 1e-9):,.2f} MB/s)"
            if p.seconds else "nothing to do: the inputs are unchanged")
    if p.empty:
        rows.append(f"note: {p.empty:,} documents (jsonl lines or parquet rows) had a null or empty "
                    f"{m['settings']['text_field']!r} and were skipped")
    asked = m["settings"].get("vocab_size")
    if m["tokenizer"]["type"] == "bpe" and asked and m["vocab_size"] < asked:
        rows.append(f"note: the bpe tokenizer learned {m['vocab_size']:,} ids, not --vocab-size {asked:,}: a corpus "
                    "this small holds too few distinct merges; runs on it record the real size")
    return "\n".join([f"dataset {root}: {result.action} | {len(m['sources'])} source files | tokenizer "
                      f"{m['tokenizer']['type']} (vocab {m['vocab_size']:,}, end-of-text id {m['eot_id']}, "
                      f"{m['dtype']} shards)", *rows, work,
                      f"train on it: python train.py --data {root.name}"
                      + (f" --data-dir {root.parent.parent}" if root.parent.parent != Path("data") else "")])


if __name__ == "__main__":
    run_main(main)

"""Score a trained run's export on any data: loss, perplexity, bits per byte, top-1/top-5 accuracy; on
prompt/response pairs greedy exact match; on benchmark files (HellaSwag, ARC, PIQA, LAMBADA, generic
multiple choice) lm-eval's acc, acc_norm, acc_bytes and llm.c's acc_per_token, each also centred.

    python evaluate.py --run latest --data shakespeare                # its val split
    python evaluate.py --run runs/<id> --data new_text.txt --split train --max-tokens 200000
    python evaluate.py --run runs/<id> --data web --name web-val      # a prepared dataset
    python evaluate.py --run latest --data reverse_words              # pairs: the held-out prompts
    python evaluate.py --run latest --data test_pairs.jsonl --split all
    python evaluate.py --run latest --data hellaswag_val.jsonl        # a benchmark: told by its fields
    python evaluate.py --run latest --data lambada:lambada_test.jsonl # a benchmark named before a colon

Text is scored in consecutive windows with the KV-less batched forward, deterministically; pairs on
their responses, plus the share of prompts whose greedy answer equals the response exactly, with the
first failures shown (evaluation/scoring.py has the details); benchmarks item by item as lm-eval scores
them (evaluation/likelihood.py). Results go to the console (a table), to
runs/<id>/evals/<timestamp>_<name>.json, and to the run's TensorBoard (and Aim, when the run used it)
under eval/<name>/.
"""

from __future__ import annotations

import argparse
import sys

from config import PROJECT_DIR, Parser, add_fields
from evaluation.metrics import report
from evaluation.scoring import evaluate_run
from rundir.meta import code_note
from rundir.run_dir import resolve_run
from utils.cli import run_main
from utils.device import resolve_device


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest", help="a run directory, its name under --runs-dir, or latest")
    parser.add_argument("--data", required=True, help="what train.py's --data takes: shakespeare, pydoc, a text file, "
                                                      "a directory, globs, .jsonl/.parquet files, a prepared dataset, "
                                                      "prompt/response pairs (.jsonl), a task (reverse_words), or a "
                                                      "benchmark file (hellaswag.jsonl, lambada:FILE.jsonl)")
    parser.add_argument("--split", default="val", choices=("train", "val", "all"),
                        help="the split to score (default val: for pairs, the held-out prompts; a "
                             "benchmark file is scored whole)")
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=100_000,
                        help="text: score at most this many tokens (default 100000; 0 = the whole split)")
    parser.add_argument("--max-pairs", "--max_pairs", type=int, default=0,
                        help="pairs: score at most this many, in file order (default 0 = all of the split)")
    parser.add_argument("--max-items", "--max_items", type=int, default=0,
                        help="benchmarks: score the first this many items (default 0 = all)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=0,
                        help="windows (pairs: prompts; benchmarks: choices) per forward (default 8 "
                             "windows, 64 prompts, 32 choices)")
    parser.add_argument("--name", help="the evaluation's name in evals/ and eval/<name>/ (default: the data's name)")
    add_fields(parser, ("runs_dir", "data_dir", "device"), defaults={"device": "cpu"})
    args = parser.parse_args(argv)
    if min(args.max_tokens, args.max_pairs, args.max_items, args.batch_size) < 0:
        raise ValueError("--max-tokens, --max-pairs, --max-items and --batch-size must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run = resolve_run(args.run, args.runs_dir)
    notes = [code_note(run.path, PROJECT_DIR)]
    evaluation = evaluate_run(run, args.data, split=args.split, name=args.name or "", data_dir=args.data_dir,
                              max_tokens=args.max_tokens, max_pairs=args.max_pairs, max_items=args.max_items,
                              batch_size=args.batch_size,
                              device=resolve_device(args.device), notes=notes)
    for note in filter(None, notes):
        print(note, file=sys.stderr)
    print(report(*evaluation))
    return 0


if __name__ == "__main__":
    run_main(main)

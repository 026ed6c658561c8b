"""Score a trained run's export on any data: loss, perplexity, bits per byte, top-1/top-5 accuracy.

    python evaluate.py --run latest --data shakespeare                # its val split
    python evaluate.py --run runs/<id> --data new_text.txt --split train --max-tokens 200000
    python evaluate.py --run runs/<id> --data web --name web-val      # a prepared dataset

The split's tokens are cut into consecutive windows of block_size + 1 (each token after the first is
scored once, given the tokens before it in its window), run through the KV-less batched forward in
eval mode, up to --max-tokens targets: the same numbers every time. Results
go to the console (a table), to runs/<id>/evals/<timestamp>_<name>.json, and to the run's TensorBoard
(and Aim, when the run used it) under eval/<name>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from config import Parser
from data import Corpus, prepare_corpus
from utils.cli import run_main
from utils.device import resolve_device
from utils.export import load_export
from utils.files import atomic_write_json, read_json_object
from utils.runs import resolve_run

TOP_K = 5


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest", help="a run directory, its name under --runs-dir, or latest")
    parser.add_argument("--data", required=True, help="what train.py's --data takes: shakespeare, pydoc, a text file, "
                                                      "a directory, globs, .jsonl/.parquet files, a prepared dataset")
    parser.add_argument("--split", default="val", choices=("train", "val"), help="the split to score (default val)")
    parser.add_argument("--max-tokens", "--max_tokens", type=int, default=100_000,
                        help="score at most this many tokens (default 100000; 0 = the whole split)")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=8, help="windows per forward (default 8)")
    parser.add_argument("--name", help="the evaluation's name in evals/ and eval/<name>/ (default: the data's name)")
    parser.add_argument("--runs-dir", "--runs_dir", default="runs", help="where the runs are (default runs)")
    parser.add_argument("--data-dir", "--data_dir", default="data", help="data cache and prepared datasets (default data)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    args = parser.parse_args(argv)
    if args.max_tokens < 0 or args.batch_size < 1:
        raise ValueError("--max-tokens must be >= 0 and --batch-size >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    run_dir = resolve_run(args.run, args.runs_dir)
    device = resolve_device(args.device)
    export = load_export(run_dir, device)
    cfg = dataclasses.replace(export.config, data=args.data, data_dir=args.data_dir)
    corpus = prepare_corpus(cfg, export.tokenizer)
    results = score(export.model, corpus, args.split, cfg.block_size, args.max_tokens, args.batch_size, device)
    name = args.name or default_name(args.data)
    record = {"run": run_dir.name, "data": corpus.name, "split": args.split, "name": name,
              "iteration": read_json_object(run_dir / "meta" / "status.json").get("iteration"), **results}
    path = save(run_dir, name, record)
    print(table(record))
    print(f"saved {path}")
    return 0


@torch.no_grad()
def score(model: torch.nn.Module, corpus: Corpus, split: str, block_size: int, max_tokens: int, batch_size: int,
          device: torch.device) -> dict:
    """Loss, perplexity, bits per byte and top-1/top-5 accuracy over consecutive windows of the split."""
    model.eval()
    windows = list(_windows(corpus.splits[split], block_size, max_tokens))
    if not windows:
        raise ValueError(f"the {split} split of {corpus.name} has no two tokens to score; use more data")
    nll, top1, top5, n = 0.0, 0, 0, 0
    eot = corpus.tokenizer.eot_id
    text_bytes = 0
    for i in range(0, len(windows), batch_size):
        for length, group in _same_length(windows[i:i + batch_size]):
            rows = torch.from_numpy(np.stack(group).astype(np.int64)).to(device)  # (B, length + 1)
            logits, _ = model(rows[:, :-1])  # (B, T, V)
            targets = rows[:, 1:]  # (B, T)
            nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
            best = logits.topk(TOP_K, dim=-1).indices  # (B, T, 5)
            top1 += (best[..., 0] == targets).sum().item()
            top5 += (best == targets[..., None]).any(-1).sum().item()
            n += targets.numel()
            ids = targets.flatten().cpu().numpy()
            text_bytes += len(corpus.tokenizer.decode(ids[ids != eot] if eot is not None else ids)
                              .encode("utf-8", "surrogatepass"))
    loss = nll / n
    return {"tokens": n, "loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte":
            nll / math.log(2) / max(text_bytes, 1), "top1_accuracy": top1 / n, "top5_accuracy": top5 / n}


def _windows(arrays: list[np.ndarray], block_size: int, max_tokens: int):
    """Consecutive windows of up to block_size + 1 tokens (each scores its last block_size), in order,
    until max_tokens targets (0: all)."""
    left = max_tokens or math.inf
    for arr in arrays:
        for start in range(0, len(arr) - 1, block_size):
            window = np.asarray(arr[start:start + block_size + 1])
            if len(window) < 2 or left <= 0:
                break
            window = window[:int(min(len(window), left + 1))]
            left -= len(window) - 1
            yield window
        if left <= 0:
            return


def _same_length(windows: list[np.ndarray]):
    """Windows grouped by length (the last of a split is shorter), so each group stacks into one batch."""
    lengths = sorted({len(w) for w in windows}, reverse=True)
    for length in lengths:
        yield length - 1, [w for w in windows if len(w) == length]


def default_name(data: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data.rstrip("/")).name.split(".")[0]) or "data"


def save(run_dir: Path, name: str, record: dict) -> Path:
    """evals/<timestamp>_<name>.json, then the run's TensorBoard (and Aim) under eval/<name>/."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    path, n = run_dir / "evals" / f"{stamp}_{name}.json", 2
    while path.exists():  # two evaluations in one second keep both
        path, n = run_dir / "evals" / f"{stamp}_{name}-{n}.json", n + 1
    record = {**record, "evaluated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, record)
    metrics = {k: record[k] for k in ("loss", "perplexity", "bits_per_byte", "top1_accuracy", "top5_accuracy")}
    step = record.get("iteration") or 0
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "logs" / "tensorboard")) as writer:
        for key, value in metrics.items():
            writer.add_scalar(f"eval/{name}/{key}", value, step)
    aim_hash = read_json_object(run_dir / "meta" / "status.json").get("aim_run_hash")
    if aim_hash:
        _track_aim(run_dir, aim_hash, name, metrics, step)
    return path


def _track_aim(run_dir: Path, run_hash: str, name: str, metrics: dict, step: int) -> None:
    """Into the run's own Aim run; a missing Aim repo is a note, not a failure: the JSON has it all."""
    config = read_json_object(run_dir / "meta" / "full_config.json")
    try:
        from aim import Run

        run = Run(run_hash=run_hash, repo=config.get("aim_repo", "."))
        for key, value in metrics.items():
            run.track(value, name=key, step=step, context={"eval": name})
        run.close()
    except Exception as e:  # noqa: BLE001 - the evaluation itself is saved already
        print(f"note: could not add the results to Aim run {run_hash}: {type(e).__name__}: {e}", file=sys.stderr)


def table(record: dict) -> str:
    rows = [("tokens", f"{record['tokens']:,}"), ("loss", f"{record['loss']:.4f}"),
            ("perplexity", f"{record['perplexity']:.3f}"), ("bits per byte", f"{record['bits_per_byte']:.4f}"),
            ("top-1 accuracy", f"{record['top1_accuracy']:.2%}"), ("top-5 accuracy", f"{record['top5_accuracy']:.2%}")]
    head = f"{record['run']} on {record['data']} ({record['split']}), as '{record['name']}'"
    return "\n".join([head, *(f"  {k:<15} {v:>12}" for k, v in rows)])


if __name__ == "__main__":
    run_main(main)

"""What every score reports, computed and printed one way: loss, perplexity, bits per byte, top-k accuracy.

    hits = top_k_hits(logits, targets)                       # (top-1, top-5) correct predictions
    metrics = token_metrics(nll_sum, top1, top5, tokens, text_bytes)
    print(report(record, path))                              # evaluate.py's table, and a plan's
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from data import bits_per_byte
from evaluation.likelihood import ACCURACIES, skipped_reasons

TOP_K = 5


def top_k_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many of the targets (N,) are the model's first guess, and among its TOP_K, from logits (N, V)."""
    best = logits.topk(min(TOP_K, logits.size(-1)), dim=-1).indices  # (N, 5)
    return int((best[:, 0] == targets).sum()), int((best == targets[:, None]).any(-1).sum())


def token_metrics(nll: float, top1: int, top5: int, tokens: int, text_bytes: int) -> dict[str, float]:
    """loss, perplexity, bits per byte and top-1/top-5 accuracy of `tokens` scored targets."""
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": bits_per_byte(loss, tokens, text_bytes),
            "top1_accuracy": top1 / tokens, "top5_accuracy": top5 / tokens}


def skipped_note(record: dict, data: str) -> str:
    """One line: how many items of the benchmark file `data` were skipped, and why."""
    why = skipped_reasons(record["skipped_why"])
    return (f"note: {record['skipped']:,} of {record['skipped'] + record['items']:,} items of {data} were "
            f"skipped and are not in the scores: {why}")


def benchmark_table(record: dict) -> str:
    """A benchmark record: each accuracy beside its centred value, or a last word's accuracy and loss."""
    skipped = f", {record['skipped']:,} skipped" if record["skipped"] else ""
    lines = [f"{record['run']} on {record['data']} ({record['benchmark']}, {record['items']:,} items{skipped}), "
             f"as '{record['name']}'"]
    if record["kind"] == "lastword":
        lines += [f"  {'acc':<15} {record['acc']:>12.2%}", f"  {'loss':<15} {record['loss']:>12.4f}",
                  f"  {'perplexity':<15} {record['perplexity']:>12.3f}"]
        return "\n".join(lines)
    lines.append(f"  {'':<15} {'accuracy':>12} {'centred':>10}   (chance {record['chance']:.2%})")
    lines += [f"  {rule:<15} {record[rule]:>12.2%} {record[rule + '_centered']:>10.4f}"
              for rule in ACCURACIES]
    return "\n".join(lines)


def table(record: dict) -> str:
    """The console's view of a record: its metrics, and for pairs the first failures."""
    if "benchmark" in record:
        return benchmark_table(record)
    rows = [("pairs", f"{record['pairs']:,}")] if "pairs" in record else []
    rows += [("tokens", f"{record['tokens']:,}"), ("loss", f"{record['loss']:.4f}"),
             ("perplexity", f"{record['perplexity']:.3f}"), ("bits per byte", f"{record['bits_per_byte']:.4f}"),
             ("top-1 accuracy", f"{record['top1_accuracy']:.2%}"), ("top-5 accuracy", f"{record['top5_accuracy']:.2%}")]
    if "exact_match" in record:
        rows.append(("exact match", f"{record['exact_match']:.2%}"))
    what = "responses of " if "pairs" in record else ""
    lines = [f"{record['run']} on {what}{record['data']} ({record['split']}), as '{record['name']}'",
             *(f"  {k:<15} {v:>12}" for k, v in rows)]
    if record.get("truncated"):
        lines.append(f"  ({record['truncated']:,} examples longer than block_size + 1 were cut to it)")
    for f in record.get("failures", []):
        lines.append(f"  failed: {f['prompt']!r} -> {f['got']!r} (expected {f['expected']!r})")
    return "\n".join(lines)


def report(record: dict, path: Path) -> str:
    """What an evaluation prints, evaluate.py's and a plan's alike: the table, then where it was saved."""
    return f"{table(record)}\nsaved {path}"

"""Scoring a model on data, as evaluate.py and train.py's plans use it, and where the results go.

    record, path, note = evaluate_run(run_dir, "reverse_words", split="val")   # what evaluate.py does
    print(table(record))                 # path: runs/<id>/evals/<ts>_<name>.json; also TensorBoard/Aim eval/<name>/
    results = score_windows(model, arrays, tokenizer, block_size, max_tokens, batch_size, device)  # text, datasets
    results = score_pairs(model, examples, tokenizer, block_size, batch_size, device)              # prompt/response

Text is cut into consecutive windows of block_size + 1 (each token after the first is scored once,
given the tokens before it in its window) and run through the KV-less batched forward in eval mode:
the same numbers every time. Pairs are scored on their responses (and end-of-text): loss and
next-token accuracy with the prompt given (teacher forcing), and greedy exact match: the model's own
answer to the prompt, up to its end-of-text, must equal the response. Nothing here parses arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data import prepare_corpus
from model import LanguageModel, grow_vocab
from corpus.pairs import Example, pack
from rundir.export import load_export
from utils.files import atomic_write_json, read_json_object

TOP_K = 5
SHOWN_FAILURES = 5
METRICS = ("loss", "perplexity", "bits_per_byte", "top1_accuracy", "top5_accuracy", "exact_match")


@torch.no_grad()
def score_windows(model: torch.nn.Module, arrays: Sequence[np.ndarray], tokenizer, block_size: int, max_tokens: int,
                  batch_size: int, device: torch.device) -> dict:
    """Loss, perplexity, bits per byte and top-1/top-5 accuracy over consecutive windows of the arrays."""
    model.eval()
    windows = list(_windows(arrays, block_size, max_tokens))
    if not windows:
        raise ValueError("the data has no two tokens to score; use more data")
    nll, top1, top5, n = 0.0, 0, 0, 0
    eot = tokenizer.eot_id
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
            text_bytes += len(tokenizer.decode(ids[ids != eot] if eot is not None else ids)
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


@torch.no_grad()
def score_pairs(model: torch.nn.Module, examples: Sequence[Example], tokenizer, block_size: int, batch_size: int,
                device: torch.device) -> dict:
    """Loss, perplexity, bits per byte and top-1/top-5 accuracy on the responses' tokens (and their
    end-of-text) with the prompt given; exact match of the greedy answers; the first failures."""
    model.eval()
    eot = tokenizer.eot_id
    rows = pack(examples, block_size, eot, pack_rows=False)  # one example per row: nothing else in its context
    nll, top1, top5 = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        width = int(rows.lengths[i:i + batch_size].max())  # nothing after the longest row's end is scored
        x = torch.from_numpy(rows.x[i:i + batch_size, :width]).to(device)  # (B, T)
        y = torch.from_numpy(rows.y[i:i + batch_size, :width]).to(device)  # (B, T), -1 outside the responses
        logits, _ = model(x)  # (B, T, V)
        scored = y >= 0
        logits, y = logits[scored].float(), y[scored]  # (N, V), (N,)
        nll += F.cross_entropy(logits, y, reduction="sum").item()
        best = logits.topk(min(TOP_K, logits.size(-1)), dim=-1).indices  # (N, 5)
        top1 += (best[:, 0] == y).sum().item()
        top5 += (best == y[:, None]).any(-1).sum().item()
    n = rows.total_targets
    right, failures = 0, []
    for example, (ids, ended) in zip(examples, greedy_answers(model, examples, eot, batch_size, device)):
        expected, answer = tokenizer.decode(example.response), tokenizer.decode(ids)
        if ended and answer == expected:
            right += 1
        elif len(failures) < SHOWN_FAILURES:
            failures.append({"prompt": tokenizer.decode(example.prompt), "expected": expected,
                             "got": answer + ("" if ended else " [no end-of-text]")})
    text_bytes = sum(len(tokenizer.decode(e.response).encode("utf-8", "surrogatepass")) for e in examples)
    loss = nll / n
    return {"pairs": len(examples), "tokens": n, "loss": loss, "perplexity": math.exp(min(loss, 700)),
            "bits_per_byte": nll / math.log(2) / max(text_bytes, 1), "top1_accuracy": top1 / n,
            "top5_accuracy": top5 / n, "exact_match": right / len(examples), "truncated": rows.truncated,
            "failures": failures}


def greedy_answers(model: torch.nn.Module, examples: Sequence[Example], eot: int, batch_size: int,
                   device: torch.device) -> list[tuple[list[int], bool]]:
    """Each prompt's greedy continuation up to its end-of-text, and whether it ended within the response's
    length + 1 tokens (if not it cannot match). Prompts of one length are generated together."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, example in enumerate(examples):
        by_length[len(example.prompt)].append(i)
    answers: list[tuple[list[int], bool]] = [([], False)] * len(examples)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            group = indices[start:start + batch_size]
            prompts = torch.from_numpy(np.stack([examples[i].prompt for i in group])).to(device)  # (B, P)
            budget = max(len(examples[i].response) for i in group) + 1
            out = torch.cat(list(model.generate_stream(prompts, budget, temperature=0.0)), dim=1)  # (B, budget)
            for row, i in zip(out.tolist(), group):
                row = row[:len(examples[i].response) + 1]
                answers[i] = (row[:row.index(eot)], True) if eot in row else (row, False)
    return answers


def evaluate_run(run_dir: Path, data: str, *, split: str = "val", name: str = "", data_dir: str = "data",
                 max_tokens: int = 100_000, max_pairs: int = 0, batch_size: int = 0,
                 device: torch.device = torch.device("cpu")) -> tuple[dict, Path, str]:
    """Score the run's export on `data` (anything --data takes) and save the results: (record, its
    path, a note for the console or ""). Pairs get score_pairs, anything else score_windows; batch_size
    0 is 64 prompts or 8 windows (a window's logits are block_size x vocab floats)."""
    export = load_export(run_dir, device)
    cfg = dataclasses.replace(export.config, data=data, data_dir=data_dir)
    corpus = prepare_corpus(cfg, export.tokenizer)
    model = export.model
    if corpus.tokenizer.vocab_size > model.vocab_size:  # pairs gave a char vocabulary an end-of-text id
        model = LanguageModel(export.config, corpus.tokenizer.vocab_size).to(device)
        model.load_state_dict(grow_vocab(export.model.state_dict(), corpus.tokenizer.vocab_size))
    parts = [corpus.splits[s] for s in (("train", "val") if split == "all" else (split,))]
    if corpus.kind == "pairs":
        examples = sorted((e for rows in parts for e in rows.examples), key=lambda e: e.line)[:max_pairs or None]
        results = score_pairs(model, examples, corpus.tokenizer, cfg.block_size, batch_size or 64, device)
    else:
        arrays = [a for arrays in parts for a in arrays]
        results = score_windows(model, arrays, corpus.tokenizer, cfg.block_size, max_tokens, batch_size or 8, device)
    record = {"run": run_dir.name, "data": corpus.name, "split": split, "name": name or default_name(data),
              "iteration": read_json_object(run_dir / "meta" / "status.json").get("iteration"), **results}
    return record, save(run_dir, record["name"], record), corpus.note


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
    metrics = {k: record[k] for k in METRICS if k in record}
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
    """The console's view of a record: its metrics, and for pairs the first failures."""
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

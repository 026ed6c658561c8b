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
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from corpus.pairs import Example, pack
from data import prepare_corpus
from evaluation.benchmarks import is_benchmark, read_benchmark
from evaluation.likelihood import score_benchmark
from evaluation.metrics import skipped_note, token_metrics, top_k_hits
from rundir.evals import default_name, save_eval
from rundir.export import read_export
from rundir.run_dir import RunDir
from rundir.snapshot import build_model

SHOWN_FAILURES = 5


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
            hits = top_k_hits(logits.flatten(0, 1), targets.flatten())
            top1, top5, n = top1 + hits[0], top5 + hits[1], n + targets.numel()
            ids = targets.flatten().cpu().numpy()
            text_bytes += len(tokenizer.decode(ids[ids != eot] if eot is not None else ids)
                              .encode("utf-8", "surrogatepass"))
    return {"tokens": n, **token_metrics(nll, top1, top5, n, text_bytes)}


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
        hits = top_k_hits(logits, y)
        top1, top5 = top1 + hits[0], top5 + hits[1]
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
    return {"pairs": len(examples), "tokens": n, **token_metrics(nll, top1, top5, n, text_bytes),
            "exact_match": right / len(examples), "truncated": rows.truncated, "failures": failures}


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


def score_benchmark_file(snapshot, bench, max_items: int, batch_size: int, device: torch.device,
                         notes: list[str] | None) -> dict:
    """A benchmark file's first max_items items (0: all) on the stored model, as the tokenizer it trained with
    reads them; a note says how many were skipped, and why."""
    bench = dataclasses.replace(bench, items=bench.items[:max_items or None])
    model = build_model(snapshot, device=device)
    results = score_benchmark(model, bench, snapshot.tokenizer, snapshot.config.block_size, batch_size, device)
    if notes is not None and results["skipped"]:
        notes.append(skipped_note(results, str(bench.path)))
    return results


class Evaluation(NamedTuple):
    record: dict   # run, data, split, name, iteration and the metrics
    path: Path     # where the record was saved: runs/<id>/evals/<ts>_<name>.json


def evaluate_run(run_dir: Path | RunDir, data: str, *, split: str = "val", name: str = "", data_dir: str = "data",
                 max_tokens: int = 100_000, max_pairs: int = 0, max_items: int = 0, batch_size: int = 0,
                 device: torch.device = torch.device("cpu"), notes: list[str] | None = None) -> Evaluation:
    """Score the run's export on `data` (anything --data takes) and save the results. Pairs get
    score_pairs, anything else score_windows; batch_size 0 is 64 prompts or 8 windows (a window's logits
    are block_size x vocab floats). The data decides the tokenizer before the model is built (pairs may
    give a char vocabulary its end-of-text id); lines for the user go to notes."""
    run = RunDir(run_dir)
    snapshot = read_export(run.path)
    if is_benchmark(data):
        bench = read_benchmark(data)
        source, split, default, results = str(bench.path), "all", bench.name, score_benchmark_file(
            snapshot, bench, max_items, batch_size or 32, device, notes)
    else:
        cfg = dataclasses.replace(snapshot.config, data=data, data_dir=data_dir)
        corpus = prepare_corpus(cfg, snapshot.tokenizer)
        if notes is not None and corpus.note:
            notes.append(corpus.note)
        model = build_model(snapshot, corpus.tokenizer.vocab_size, device)
        parts = [corpus.splits[s] for s in (("train", "val") if split == "all" else (split,))]
        if corpus.kind == "pairs":
            examples = sorted((e for rows in parts for e in rows.examples), key=lambda e: e.line)[:max_pairs or None]
            results = score_pairs(model, examples, corpus.tokenizer, cfg.block_size, batch_size or 64, device)
        else:
            arrays = [a for arrays in parts for a in arrays]
            results = score_windows(model, arrays, corpus.tokenizer, cfg.block_size, max_tokens, batch_size or 8,
                                    device)
        source, default = corpus.name, default_name(data)
    record = {"run": run.name, "data": source, "split": split, "name": name or default,
              "iteration": run.status().get("iteration"), **results}
    return Evaluation(record, save_eval(run, record))

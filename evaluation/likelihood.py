"""Scoring benchmark items by log-likelihood, with the numbers lm-evaluation-harness gives.

    encoded = encode_items(bench.items, tokenizer, block_size)     # lm-eval's tokenization, once
    scores = loglikelihoods(model, encoded.requests, batch_size, device)
    record = benchmark_metrics(bench, encoded, scores)             # acc, acc_norm, acc_bytes, ...

Tokens, as lm-eval's `_encode_pair`: the context's trailing spaces move to the continuation (delimiter
+ choice); the continuation's ids are those of tokenize(context + continuation) after the ids of
tokenize(context), so a BPE merge across the boundary counts as lm-eval counts it. An empty context
is the end-of-text id (lm-eval's prefix token). A request longer than block_size + 1 tokens loses its
context's first tokens, as in lm-eval; an item that cannot be scored (a character outside a char
vocabulary, a continuation longer than block_size, an empty choice, an empty context with no
end-of-text id) is skipped and counted, never scored on a substitute.

The requests of every item are scored together, longest first, in batches of rows padded on the right
(a causal model's padding changes nothing before it), and the LM head runs on the continuation's
positions only. A choice's log-likelihood is the sum over its tokens of log softmax, in float32.
Multiple choice reports the accuracy of four rules for picking a choice, each under its own name:
    acc            the largest sum of log-likelihoods               (lm-eval acc)
    acc_norm       ... divided by the choice's length in characters (lm-eval acc_norm)
    acc_bytes      ... divided by its length in UTF-8 bytes         (lm-eval acc_bytes)
    acc_per_token  ... divided by its number of tokens              (llm.c's and nanoGPT forks' HellaSwag)
and each centred on chance, (acc - chance) / (1 - chance), chance being the mean of 1 / choices (nanochat's
CORE centres so). Last-word tasks (LAMBADA) report acc (every token of the word is the greedy choice,
lm-eval's is_greedy), loss (the word's summed negative log-likelihood, the mean over items) and
perplexity exp(loss), lm-eval's perplexity.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.benchmarks import Benchmark, Item, read_benchmark

ACCURACIES = ("acc", "acc_norm", "acc_bytes", "acc_per_token")


class Request(NamedTuple):
    item: int            # index in the benchmark's items
    choice: int
    tokens: list[int]    # context + continuation, its last block_size + 1 tokens at most
    n_cont: int          # the last n_cont tokens are the continuation's: the scored ones
    whole: bool = True   # tokens hold the whole context (none cut to fit block_size + 1)


class Encoded(NamedTuple):
    requests: list[Request]
    scored: list[int]        # the items every choice of which was encoded, in order
    skipped: dict[str, int]  # why -> how many items


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair for a causal model (context non-empty)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def encode_items(items: Sequence[Item], tokenizer, block_size: int) -> Encoded:
    """Every choice of every item as a request; an item any choice of which cannot be scored is skipped
    whole and counted under its reason."""
    requests: list[Request] = []
    scored: list[int] = []
    skipped: dict[str, int] = {}
    for i, item in enumerate(items):
        try:
            mine = [_request(i, c, item, choice, tokenizer, block_size) for c, choice in enumerate(item.choices)]
        except _Skip as e:
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            continue
        requests += mine
        scored.append(i)
    return Encoded(requests, scored, skipped)


class _Skip(Exception):
    """An item this model cannot score; its message is the reason, counted."""


def _request(i: int, c: int, item: Item, choice: str, tokenizer, block_size: int) -> Request:
    if not choice:
        raise _Skip("an empty choice (its per-character score is undefined)")
    try:
        if item.context:
            context, continuation = encode_pair(tokenizer, item.context, item.delimiter + choice)
        elif tokenizer.eot_id is None:
            raise _Skip("an empty context, and the model has no end-of-text id to start from")
        else:
            context, continuation = [tokenizer.eot_id], tokenizer.encode(item.delimiter + choice)
    except ValueError:  # a char vocabulary lacks one of its characters
        raise _Skip("a character outside the model's vocabulary") from None
    if not continuation or len(continuation) > block_size:
        raise _Skip(f"a continuation of {len(continuation)} tokens (1 to block_size = {block_size} fit)")
    tokens = context + continuation
    return Request(i, c, tokens[-(block_size + 1):], len(continuation), len(tokens) <= block_size + 1)


class Scores(NamedTuple):
    loglikelihood: np.ndarray  # (requests,) float64: the continuation's summed log-probability
    greedy: np.ndarray         # (requests,) bool: every continuation token was the model's argmax


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, requests: Sequence[Request], batch_size: int,
                   device: torch.device) -> Scores:
    """Each request's continuation log-likelihood and greediness, batch_size rows at a time (identical to
    scoring each alone, up to float rounding). An item whose choices all hold its whole context has that
    context computed once, its KV cache shared by the choices (where the model allows it); the others
    (contexts cut to fit block_size) are scored as whole rows, longest first, right-padded."""
    model.eval()
    scores = Scores(np.zeros(len(requests)), np.zeros(len(requests), dtype=bool))
    by_item: dict[int, list[int]] = {}
    for r, req in enumerate(requests):
        by_item.setdefault(req.item, []).append(r)
    shared: dict[int, list[list[int]]] = {}  # context length -> items (their requests) that share a context
    alone: list[int] = []
    share = getattr(model, "flexible_cache", False)
    for rs in by_item.values():
        contexts = {tuple(requests[r].tokens[:-requests[r].n_cont]) for r in rs}
        if share and len(rs) > 1 and all(requests[r].whole for r in rs) and len(contexts) == 1:
            shared.setdefault(len(next(iter(contexts))), []).append(rs)
        else:
            alone += rs
    for items in shared.values():
        for chunk in _chunks(items, batch_size):
            _score_shared(model, requests, chunk, device, scores)
    alone.sort(key=lambda r: -len(requests[r].tokens))
    for start in range(0, len(alone), batch_size):
        _score_rows(model, requests, alone[start:start + batch_size], device, scores)
    return scores


def _chunks(items: list[list[int]], rows: int):
    """Items (each a list of requests) in chunks of at most `rows` requests (one item at least)."""
    chunk: list[list[int]] = []
    for rs in items:
        if chunk and sum(map(len, chunk)) + len(rs) > rows:
            yield chunk
            chunk = []
        chunk.append(rs)
    if chunk:
        yield chunk


def _score_shared(model, requests: Sequence[Request], items: list[list[int]], device: torch.device,
                  scores: Scores) -> None:
    """Items whose contexts have one length: each context once, then every choice from its cache."""
    order = [r for rs in items for r in rs]
    first = [requests[rs[0]] for rs in items]
    contexts = torch.tensor([req.tokens[:-req.n_cont] for req in first])                       # (G, L)
    rows = torch.tensor([g for g, rs in enumerate(items) for _ in rs])                           # (R,)
    width = max(requests[r].n_cont for r in order) - 1
    continuations = torch.zeros(len(order), width, dtype=torch.long)                             # (R, W)
    where = torch.zeros(len(order), width + 1, dtype=torch.bool)                                 # (R, W + 1)
    for row, r in enumerate(order):
        cont = requests[r].tokens[-requests[r].n_cont:]
        continuations[row, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
        where[row, :len(cont)] = True
    logits = model.shared_context_logits(contexts.to(device), rows.to(device), continuations.to(device),
                                         where.to(device))                                        # (N, V)
    _record(logits, requests, order, device, scores)


def _score_rows(model, requests: Sequence[Request], order: list[int], device: torch.device, scores: Scores) -> None:
    """Whole requests as right-padded rows; the LM head on the continuations' positions only."""
    chunk = [requests[r] for r in order]
    width = max(len(req.tokens) for req in chunk) - 1
    x = torch.zeros(len(chunk), width, dtype=torch.long)                # (B, T)
    where = torch.zeros(len(chunk), width, dtype=torch.bool)            # (B, T): the scored positions
    for row, req in enumerate(chunk):
        n = len(req.tokens) - 1
        x[row, :n] = torch.tensor(req.tokens[:-1])
        where[row, n - req.n_cont:n] = True
    _record(model.logits_at(x.to(device), where.to(device)), requests, order, device, scores)


def _record(logits: torch.Tensor, requests: Sequence[Request], order: list[int], device: torch.device,
            scores: Scores) -> None:
    """Log-softmax in float32 at each continuation token (row-major in `order`), summed per request."""
    logits = logits.float()                                                                      # (N, V)
    y = torch.tensor([t for r in order for t in requests[r].tokens[-requests[r].n_cont:]], device=device)  # (N,)
    token_ll = F.log_softmax(logits, dim=-1).gather(1, y[:, None])[:, 0].double().cpu().numpy()  # (N,)
    hit = (logits.argmax(-1) == y).cpu().numpy()                                                 # (N,)
    bounds = np.cumsum([0] + [requests[r].n_cont for r in order])
    for k, r in enumerate(order):
        scores.loglikelihood[r] = token_ll[bounds[k]:bounds[k + 1]].sum()
        scores.greedy[r] = hit[bounds[k]:bounds[k + 1]].all()


def item_results(bench: Benchmark, encoded: Encoded, scores: Scores) -> list[dict]:
    """Per scored item, what its metrics need: which choice each rule picks, or (last word) greedy and
    loss. Small and picklable, so ranks can gather them."""
    by_item: dict[int, list[int]] = {}
    for r, req in enumerate(encoded.requests):
        by_item.setdefault(req.item, []).append(r)
    out = []
    for i in encoded.scored:
        item, rs = bench.items[i], by_item[i]
        lls = scores.loglikelihood[rs]
        if bench.format.kind == "lastword":
            out.append({"item": i, "greedy": bool(scores.greedy[rs[0]]), "nll": float(-lls[0])})
            continue
        sizes = {"acc": np.ones(len(rs)), "acc_norm": [len(c) for c in item.choices],
                 "acc_bytes": [len(c.encode("utf-8")) for c in item.choices],
                 "acc_per_token": [encoded.requests[r].n_cont for r in rs]}
        # np.argmax takes the first of equal scores, as lm-eval's does
        out.append({"item": i, "label": item.label, "choices": len(rs),
                    **{rule: int(np.argmax(lls / np.asarray(size, dtype=float))) for rule, size in sizes.items()}})
    return out


def benchmark_metrics(bench: Benchmark, results: list[dict], skipped: dict[str, int]) -> dict:
    """The record's numbers from every item's results (all ranks' together)."""
    n = len(results)
    base = {"benchmark": bench.format.name, "kind": bench.format.kind, "items": n,
            "skipped": sum(skipped.values()), "skipped_why": dict(skipped), "data_sha256": bench.sha256}
    if not n:
        return base
    if bench.format.kind == "lastword":
        loss = sum(r["nll"] for r in results) / n
        acc = sum(r["greedy"] for r in results) / n
        return {**base, "acc": acc, "acc_centered": acc, "chance": 0.0, "loss": loss,
                "perplexity": float(np.exp(min(loss, 700)))}
    chance = sum(1 / r["choices"] for r in results) / n
    accs = {rule: sum(r[rule] == r["label"] for r in results) / n for rule in ACCURACIES}
    return {**base, **accs, **{f"{rule}_centered": (a - chance) / (1 - chance) for rule, a in accs.items()},
            "chance": chance}


def skipped_reasons(skipped: dict[str, int]) -> str:
    """"2 for a character outside the model's vocabulary; 1 for ...": why items were skipped, counted."""
    return "; ".join(f"{n:,} for {reason}" for reason, n in skipped.items())


def headline(record: dict, raw: bool = False) -> tuple[str, str | float]:
    """A benchmark's one number: acc_norm for multiple choice (lm-eval's, what papers report for HellaSwag),
    acc for a last word; (metric, "31.20%"), or with raw=True (metric, 0.312)."""
    metric = "acc_norm" if record["kind"] == "choice" else "acc"
    return metric, record[metric] if raw else f"{record[metric]:.2%}"


def check_scorable(bench: Benchmark, encoded: Encoded) -> None:
    """A benchmark none of whose items this model can score is an error, not a score of nothing."""
    if not encoded.scored:
        why = skipped_reasons(encoded.skipped)
        raise ValueError(f"no item of {bench.path} can be scored by this model ({why}); use a model whose "
                         "vocabulary covers the benchmark's text (a gpt2 or bpe tokenizer covers any)")


def score_benchmark(model: torch.nn.Module, bench: Benchmark, tokenizer, block_size: int, batch_size: int,
                    device: torch.device) -> dict:
    """Every item of the benchmark, scored: the record's metrics (evaluate.py's path)."""
    encoded = encode_items(bench.items, tokenizer, block_size)
    check_scorable(bench, encoded)
    scores = loglikelihoods(model, encoded.requests, batch_size, device)
    return benchmark_metrics(bench, item_results(bench, encoded, scores), encoded.skipped)


class EvalTask(NamedTuple):
    """A benchmark file as training scores it at every eval (eval_tasks): read and encoded once, at the
    start; this rank's share of the items (every world_size-th), whose results the ranks gather."""
    name: str
    bench: Benchmark
    encoded: Encoded          # this rank's items
    skipped: dict[str, int]   # every rank's: the record says them once


def prepare_eval_tasks(specs: Sequence[str], tokenizer, block_size: int, max_items: int, rank: int = 0,
                       world_size: int = 1, notes: list[str] | None = None) -> list[EvalTask]:
    """Each eval_tasks entry read (the first max_items items; 0: all) and encoded for this model, before the
    run starts: a file the model cannot score is an error now, not at the first eval."""
    tasks, names = [], set()
    for spec in specs:
        bench = read_benchmark(spec)
        if max_items and len(bench.items) > max_items:
            if notes is not None:
                notes.append(f"eval_tasks: {bench.path} has {len(bench.items):,} items; each eval scores the first "
                             f"{max_items:,} (eval_task_items; evaluate.py --data {spec} scores them all)")
            bench = dataclasses.replace(bench, items=bench.items[:max_items])
        if bench.name in names:
            raise ValueError(f"eval_tasks: two files are named {bench.name!r}; their curves would share a name, "
                             "so rename one")
        names.add(bench.name)
        encoded = encode_items(bench.items, tokenizer, block_size)
        check_scorable(bench, encoded)
        if encoded.skipped and notes is not None:
            notes.append(f"eval_tasks: {sum(encoded.skipped.values()):,} of {len(bench.items):,} items of {bench.path} "
                         f"cannot be scored by this model and are left out ({skipped_reasons(encoded.skipped)})")
        mine = set(encoded.scored[rank::world_size])
        tasks.append(EvalTask(bench.name, bench, Encoded([r for r in encoded.requests if r.item in mine],
                                                         sorted(mine), {}), encoded.skipped))
    return tasks


def score_eval_tasks(model: torch.nn.Module, tasks: Sequence[EvalTask], device: torch.device,
                     gather: Callable[[list], list[list]] = lambda mine: [mine],
                     batch_size: int = 32) -> dict[str, dict]:
    """Each task's record on the model as it is (float32, eval mode): this rank's items scored, every rank's
    results gathered (`gather`: distributed.gather under torchrun), {name: the record evaluate.py saves}."""
    out = {}
    for task in tasks:
        mine = item_results(task.bench, task.encoded, loglikelihoods(model, task.encoded.requests, batch_size, device))
        results = [r for part in gather(mine) for r in part]
        out[task.name] = {"data": str(task.bench.path), "split": "all", "name": task.name,
                          **benchmark_metrics(task.bench, results, task.skipped)}
    return out

"""evaluation/likelihood.py: batched scores equal one choice at a time, lm-eval's token boundaries, every
metric on a hand-checked item, a char model skipping what it cannot read, and evaluate.py on benchmarks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from conftest import call_main, user_error, write_benchmarks
from evaluation.benchmarks import Benchmark, Item, read_benchmark
from evaluation.likelihood import (Encoded, Request, Scores, benchmark_metrics, encode_items, encode_pair,
                                   item_results, loglikelihoods, score_benchmark)
from model import LanguageModel
from parameters import BENCHMARK_FORMATS, ModelConfig
from rundir.export import load_export
from tokenizer import Gpt2Tokenizer

CPU = torch.device("cpu")


def reference_loglikelihood(model: LanguageModel, tokenizer, item: Item, choice: str, block_size: int) -> tuple[float, bool]:
    """One choice alone: the context with its trailing spaces moved, as lm-eval does, then one forward."""
    context = item.context.rstrip()
    continuation = item.context[len(context):] + item.delimiter + choice
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    cont = whole[len(ctx):]
    ids = torch.tensor((ctx + cont)[-(block_size + 1):])
    logits, _ = model(ids[None, :-1])
    logp = F.log_softmax(logits[0, -len(cont):].double(), -1)
    targets = ids[-len(cont):]
    return logp[torch.arange(len(cont)), targets].sum().item(), bool((logits[0, -len(cont):].argmax(-1) == targets).all())


def gpt2_model(block_size: int = 24) -> tuple[LanguageModel, ModelConfig]:
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, tokenizer="gpt2").validate()
    torch.manual_seed(0)
    return LanguageModel(cfg, Gpt2Tokenizer.vocab_size).eval(), cfg


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_batched_scores_equal_each_choice_scored_alone(tokenizer: str, trained_run: Path, tmp_path: Path) -> None:
    if tokenizer == "char":
        export = load_export(trained_run)
        model, tok, block = export.model, export.tokenizer, export.config.block_size
    else:  # a block of 24 tokens: the longest items lose their context's first tokens, as in lm-eval
        (model, cfg), tok = gpt2_model(), Gpt2Tokenizer()
        block = cfg.block_size
    files = write_benchmarks(tmp_path)
    for fmt, path in files.items():
        bench = read_benchmark(("lambada:" if fmt == "lambada" else "") + str(path))
        encoded = encode_items(bench.items, tok, block)
        if tokenizer == "char" and fmt in ("arc", "piqa"):  # "Question:": no Q in the tiny corpus
            assert encoded.skipped == {"a character outside the model's vocabulary": len(bench.items)}
            continue
        assert encoded.scored == list(range(len(bench.items))) and not encoded.skipped, (fmt, encoded.skipped)
        scores = loglikelihoods(model, encoded.requests, batch_size=5, device=CPU)
        for r, req in enumerate(encoded.requests):
            item = bench.items[req.item]
            ll, greedy = reference_loglikelihood(model, tok, item, item.choices[req.choice], block)
            assert scores.loglikelihood[r] == pytest.approx(ll, abs=1e-4) and scores.greedy[r] == greedy
        record = benchmark_metrics(bench, item_results(bench, encoded, scores), encoded.skipped)
        if fmt != "lambada":
            picks = [int(np.argmax([reference_loglikelihood(model, tok, it, c, block)[0] for c in it.choices]))
                     for it in bench.items]
            assert record["acc"] == sum(p == it.label for p, it in zip(picks, bench.items)) / len(bench.items)


def test_token_boundaries_are_lm_evals() -> None:
    tok = Gpt2Tokenizer()
    # the continuation's ids are what follows the context's in the whole text's
    assert encode_pair(tok, "Hello", " world") == (tok.encode("Hello"), tok.encode("Hello world")[1:])
    # a context's trailing space moves to the continuation: " yes" is one token, not " " + "yes"
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes") and len(cont) == 1
    # a merge across the boundary: "Hello wor" + "ld" is "Hello world", whose ids leave nothing after the context's
    assert encode_pair(tok, "Hello wor", "ld")[1] == []
    bench = Benchmark("b", Path("b.jsonl"), BENCHMARK_FORMATS.lookup("generic"),
                      [Item("Hello wor", ("ld", "k"), 0, ""), Item("", ("x", "y"), 0)], "0" * 64)
    encoded = encode_items(bench.items, tok, 16)
    # the empty context is lm-eval's prefix token, the end-of-text id
    assert encoded.scored == [1] and encoded.requests[0].tokens == [tok.eot_id, *tok.encode(" x")]
    assert encoded.skipped == {"a continuation of 0 tokens (1 to block_size = 16 fit)": 1}


def test_every_metric_on_a_hand_checked_item() -> None:
    # choice:          "a"     "bbbb"   "éé" (4 bytes)  "cc"
    # tokens:           2       4        1               6
    # log-likelihood: -2.0    -3.2     -2.4            -3.0
    # sum:            -2.0*   -3.2     -2.4            -3.0     -> acc picks 0
    # per character:  -2.0    -0.8*    -1.2            -1.5     -> acc_norm picks 1
    # per byte:       -2.0    -0.8     -0.6*           -1.5     -> acc_bytes picks 2
    # per token:      -1.0    -0.8     -2.4            -0.5*    -> acc_per_token picks 3
    item = Item("ctx", ("a", "bbbb", "éé", "cc"), 2)
    bench = Benchmark("b", Path("b.jsonl"), BENCHMARK_FORMATS.lookup("generic"), [item, item._replace(label=3)], "0" * 64)
    requests = [Request(i, c, [0] * (n + 1), n) for i in (0, 1) for c, n in enumerate((2, 4, 1, 6))]
    scores = Scores(np.array([-2.0, -3.2, -2.4, -3.0] * 2), np.zeros(8, dtype=bool))
    results = item_results(bench, Encoded(requests, [0, 1], {}), scores)
    assert [{k: r[k] for k in ("acc", "acc_norm", "acc_bytes", "acc_per_token")} for r in results] == [
        {"acc": 0, "acc_norm": 1, "acc_bytes": 2, "acc_per_token": 3}] * 2
    record = benchmark_metrics(bench, results, {"why": 1})
    assert (record["acc"], record["acc_norm"], record["acc_bytes"], record["acc_per_token"]) == (0, 0, 0.5, 0.5)
    assert record["chance"] == 0.25 and record["acc_bytes_centered"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert record["acc_centered"] == pytest.approx(-1 / 3) and record["items"] == 2 and record["skipped"] == 1


def test_a_last_word_is_right_only_if_every_token_is_greedy_and_its_loss_is_summed() -> None:
    bench = Benchmark("l", Path("l.jsonl"), BENCHMARK_FORMATS.lookup("lambada"),
                      [Item("a b", ("c",), 0), Item("d e", ("f",), 0)], "0" * 64)
    requests = [Request(0, 0, [0, 1, 2], 2), Request(1, 0, [0, 1, 2], 2)]
    record = benchmark_metrics(bench, item_results(bench, Encoded(requests, [0, 1], {}),
                                                   Scores(np.array([-1.0, -3.0]), np.array([True, False]))), {})
    assert record["acc"] == 0.5 and record["loss"] == 2.0 and record["perplexity"] == pytest.approx(math.exp(2.0))


def test_a_char_model_skips_and_counts_what_it_cannot_read(trained_run: Path, tmp_path: Path) -> None:
    export = load_export(trained_run)
    path = tmp_path / "g.jsonl"
    items = [{"context": "All:\nspeak", "choices": ["all", "me"], "label": 0},
             {"context": "All:\nspeak", "choices": ["all", "€uro"], "label": 0},   # € is not in the vocabulary
             {"context": "", "choices": ["all", "me"], "label": 1}]               # no end-of-text to start from
    path.write_text("".join(json.dumps(d) + "\n" for d in items), encoding="utf-8")
    record = score_benchmark(export.model, read_benchmark(str(path)), export.tokenizer, export.config.block_size, 8, CPU)
    assert record["items"] == 1 and record["skipped"] == 2
    assert record["skipped_why"] == {"a character outside the model's vocabulary": 1,
                                     "an empty context, and the model has no end-of-text id to start from": 1}
    res = call_main(evaluate.main, "--run", str(trained_run), "--data", str(path))
    assert "note: 2 of 3 items of" in res.stderr and "1 for a character outside the model's vocabulary" in res.stderr
    assert "(generic, 1 items, 2 skipped)" in res.stdout
    path.write_text(json.dumps(items[1]) + "\n", encoding="utf-8")
    with user_error("no item of", "can be scored by this model", "1 for a character outside"):
        call_main(evaluate.main, "--run", str(trained_run), "--data", str(path))


def test_evaluate_cli_prints_saves_and_tracks_a_benchmark(trained_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = write_benchmarks(tmp_path)
    res = call_main(evaluate.main, "--run", str(trained_run), "--data", str(files["hellaswag"]), "--name", "hs")
    assert res.returncode == 0 and "acc_norm" in res.stdout and "centred" in res.stdout and "chance 25.00%" in res.stdout
    (saved,) = sorted((trained_run / "evals").glob("*_hs.json"))
    record = json.loads(saved.read_text())
    assert record["benchmark"] == "hellaswag" and record["items"] == 12 and len(record["data_sha256"]) == 64
    assert set(record) >= {"acc", "acc_norm", "acc_bytes", "acc_per_token", "acc_norm_centered", "chance"}
    events = EventAccumulator(str(trained_run / "logs" / "tensorboard")).Reload()
    assert "eval/hs/acc_norm" in events.Tags()["scalars"]
    res = call_main(evaluate.main, "--run", str(trained_run), "--data", f"lambada:{files['lambada']}", "--max-items", "4")
    assert "lambada_own" in res.stdout and "perplexity" in res.stdout and "(lambada, 4 items)" in res.stdout

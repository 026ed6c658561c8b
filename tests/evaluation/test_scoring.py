"""evaluate.py and evaluation.py: their numbers against reference computations (text windows; pairs' loss
and greedy exact match), where the results go, and the errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from conftest import TINY_TEXT, call_main, run_cli, user_error
from data import prepare_corpus
from evaluation.scoring import score_pairs, score_windows
from corpus.pairs import encode_pairs, read_pairs
from tokenizer import CharTokenizer
from rundir.export import load_export


def test_scores_equal_a_window_by_window_reference(trained_run: Path, tmp_path: Path) -> None:
    export = load_export(trained_run)
    cfg = export.config.__class__(**{**export.config.to_dict(), "data": "pydoc", "data_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="not in the vocabulary"):  # pydoc has characters TINY_TEXT lacks
        prepare_corpus(cfg, export.tokenizer)
    (tmp_path / "t.txt").write_text(TINY_TEXT[::-1], encoding="utf-8")  # same characters, unseen text
    cfg = export.config.__class__(**{**export.config.to_dict(), "data": str(tmp_path / "t.txt"), "data_dir": str(tmp_path)})
    corpus = prepare_corpus(cfg, export.tokenizer)
    got = score_windows(export.model, corpus.splits["val"], corpus.tokenizer, cfg.block_size, 300, 3, torch.device("cpu"))
    ids = np.concatenate(corpus.splits["val"]).astype(np.int64)
    nll, top1, n, T = 0.0, 0, 0, cfg.block_size
    for start in range(0, len(ids) - 1, T):  # one window at a time, as a reader would score them
        w = torch.from_numpy(ids[start:start + T + 1])[None]
        w = w[:, :min(w.size(1), 300 - n + 1)]
        if w.size(1) < 2 or n >= 300:
            break
        logits, _ = export.model(w[:, :-1])
        nll += F.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
        top1 += (logits[0].argmax(-1) == w[0, 1:]).sum().item()
        n += w.size(1) - 1
    assert got["tokens"] == n == 300
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5) and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert got["top1_accuracy"] == top1 / n and got["top1_accuracy"] <= got["top5_accuracy"] <= 1
    text = export.tokenizer.decode(ids[1:n + 1])
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)


def test_results_go_to_evals_and_tensorboard_and_repeat_exactly(trained_run: Path, tiny_corpus: Path,
                                                                tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--run", str(trained_run), "--data", str(tiny_corpus), "--data-dir", str(tmp_path / "d"), "--name", "tiny"]
    first = call_main(evaluate.main, *args)
    assert first.returncode == 0 and "top-5 accuracy" in first.stdout and "perplexity" in first.stdout
    call_main(evaluate.main, *args, "--max-tokens", "0")
    saved = sorted((trained_run / "evals").glob("*_tiny.json"))
    assert saved, "no evals/<timestamp>_tiny.json"
    record = json.loads(saved[0].read_text())
    assert record["split"] == "val" and record["name"] == "tiny" and 0 < record["top1_accuracy"] <= 1
    again = call_main(evaluate.main, *args)
    assert again.stdout.splitlines()[:7] == first.stdout.splitlines()[:7]  # deterministic
    events = EventAccumulator(str(trained_run / "logs" / "tensorboard"))
    events.Reload()
    assert {"eval/tiny/loss", "eval/tiny/bits_per_byte", "eval/tiny/top5_accuracy"} <= set(events.Tags()["scalars"])


def test_bad_input_is_one_line(trained_run: Path, tmp_path: Path) -> None:
    (tmp_path / "alien.txt").write_text("Zebra quiz! ✓", encoding="utf-8")
    with user_error("not in the vocabulary", "'✓'"):
        call_main(evaluate.main, "--run", str(trained_run), "--data", str(tmp_path / "alien.txt"), "--data-dir",
                  str(tmp_path / "d"))
    (tmp_path / "empty.txt").write_text("")
    with user_error("contains no text"):
        call_main(evaluate.main, "--run", str(trained_run), "--data", str(tmp_path / "empty.txt"))
    res = run_cli("evaluate.py", "--run", str(tmp_path / "nope"), "--data", "pydoc")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")


def test_pair_scores_equal_a_one_prompt_at_a_time_reference(trained_run: Path, pairs_file: Path) -> None:
    export = load_export(trained_run)
    tok = CharTokenizer(export.tokenizer.chars, end_of_text=True)
    from model import LanguageModel, grow_vocab
    model = LanguageModel(export.config, tok.vocab_size)
    model.load_state_dict(grow_vocab(export.model.state_dict(), tok.vocab_size))
    model.eval()
    with torch.no_grad():  # end-of-text wins wherever a newline would (logit x 1.01): answers end at a line
        model.transformer.wte.weight[tok.eot_id] = 1.01 * model.transformer.wte.weight[tok.encode("\n")[0]]
    examples = encode_pairs(read_pairs(pairs_file)[:20], tok)
    for i in range(0, 20, 2):  # every other response is what the model answers, when it ends within 20 tokens
        out = model.generate(torch.tensor(examples[i].prompt)[None], 20, temperature=0)[0, len(examples[i].prompt):]
        if tok.eot_id in out.tolist():
            answer = np.array(out.tolist()[:out.tolist().index(tok.eot_id)], dtype=np.int64)
            examples[i] = dataclasses.replace(examples[i], response=answer)
    got = score_pairs(model, examples, tok, export.config.block_size, 3, torch.device("cpu"))
    nll, n, right, first_failure = 0.0, 0, 0, None
    for e in examples:
        ids = torch.tensor(np.concatenate([e.prompt, e.response, [tok.eot_id]]))[:export.config.block_size + 1]
        logits, _ = model(ids[None, :-1])
        answer = slice(len(e.prompt) - 1, None)
        nll += F.cross_entropy(logits[0][answer], ids[1:][answer], reduction="sum").item()
        n += len(ids) - len(e.prompt)
        out = model.generate(torch.tensor(e.prompt)[None], len(e.response) + 1, temperature=0)[0, len(e.prompt):].tolist()
        ended = tok.eot_id in out
        text = tok.decode(out[:out.index(tok.eot_id)] if ended else out)
        if ended and text == tok.decode(e.response):
            right += 1
        elif first_failure is None:
            first_failure = {"prompt": tok.decode(e.prompt), "expected": tok.decode(e.response),
                             "got": text + ("" if ended else " [no end-of-text]")}
    assert got["pairs"] == 20 and got["tokens"] == n
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert 0 < right < 20 and got["exact_match"] == right / 20
    assert got["failures"][0] == first_failure


def test_pairs_report_exact_match_and_failures(trained_run: Path, pairs_file: Path, tmp_path: Path) -> None:
    res = call_main(evaluate.main, "--run", str(trained_run), "--data", str(pairs_file), "--split", "all",
                    "--max-pairs", "30", "--data-dir", str(tmp_path / "d"), "--name", "pairs")
    assert "exact match" in res.stdout and "failed: " in res.stdout
    assert "added id" in res.stderr  # the shared run's char vocabulary had no end-of-text id
    record = json.loads(sorted((trained_run / "evals").glob("*_pairs.json"))[-1].read_text())
    assert record["pairs"] == 30 and record["split"] == "all" and 0 <= record["exact_match"] <= 1
    assert record["failures"] and set(record["failures"][0]) == {"prompt", "expected", "got"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', encoding="utf-8")
    with user_error("line 2 is not JSON"):
        call_main(evaluate.main, "--run", str(trained_run), "--data", str(tmp_path / "bad.jsonl"))

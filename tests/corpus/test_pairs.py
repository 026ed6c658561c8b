"""pairs.py and fine-tuning on prompt/response pairs: reading, the held-out split, the loss mask, packing,
the step-wide loss normalization (accumulation equals the big batch), and train.py end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
import train
from conftest import TINY_TEXT, call_main, user_error
from training.batches import get_batch, step_targets
from data import ensure_task, prepare_corpus
from model import LanguageModel, grow_vocab
from corpus.pairs import PackedRows, encode_pairs, pack, read_pairs, split_pairs
from parameters import ModelConfig
from corpus.tasks import TASKS, generate, task_bytes
from tokenizer import CharTokenizer
from training.step import train_step

CPU = torch.device("cpu")
TOK = CharTokenizer(sorted(set(TINY_TEXT)), end_of_text=True)


def rows_of(path: Path, block_size: int = 32, **kw) -> PackedRows:
    return pack(encode_pairs(read_pairs(path), TOK), block_size, TOK.eot_id, **kw)


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- reading and splitting ---

@pytest.mark.parametrize("line,fragments", [
    ("not json", ("line 2 is not JSON",)),
    ('["a", "b"]', ("line 2 is a JSON list",)),
    ('{"prompt": "a"}', ("line 2 has no \"response\" (or \"truth\")",)),
    ('{"response": "a"}', ("line 2 has no \"prompt\"",)),
    ('{"prompt": "a", "response": 3}', ("line 2: response is a int, not a string",)),
    ('{"prompt": "", "response": "a"}', ("line 2: the prompt is empty",)),
])
def test_a_malformed_line_is_one_error_naming_it(tmp_path, line, fragments):
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "ok", "response": "ok"}', line)
    with user_error(str(path), *fragments):
        read_pairs(path)


def test_truth_is_read_as_the_response_and_blank_lines_are_skipped(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "a", "truth": "b"}', "", '{"prompt": "c", "response": "d"}')
    assert [(p.prompt, p.response, p.line) for p in read_pairs(path)] == [("a", "b", 1), ("c", "d", 3)]
    with user_error("holds no prompt/response pairs"):
        read_pairs(write_lines(tmp_path / "empty.jsonl", ""))


def test_val_holds_whole_prompts_chosen_by_their_hash(pairs_file):
    pairs = read_pairs(pairs_file)
    splits = split_pairs(pairs, 0.25)
    assert sorted(p.line for s in splits.values() for p in s) == [p.line for p in pairs]
    assert 10 < len(splits["val"]) < 50
    again = split_pairs(list(reversed(pairs)), 0.25)  # a prompt's side does not depend on its neighbours
    assert {p.prompt for p in again["val"]} == {p.prompt for p in splits["val"]}
    two = split_pairs(pairs[:2], 0.1)  # too few for the hash: one on each side
    assert len(two["train"]) == len(two["val"]) == 1


def test_a_prompt_is_never_on_both_sides_even_when_the_hash_cannot_split_them(tmp_path):
    """101 pairs with one prompt gave "100 train, 1 held-out val prompts": the last pair moved to val."""
    same = [json.dumps({"prompt": "reverse:\n", "response": f"r{i}"}) for i in range(101)]
    with user_error("all 101 pairs have the same prompt", "at least 2 different prompts"):
        split_pairs(read_pairs(write_lines(tmp_path / "same.jsonl", *same)), 0.1)
    # two prompts, many pairs each, and a val_fraction that holds out neither: one whole prompt moves
    two = [json.dumps({"prompt": p, "response": str(i)}) for i in range(50) for p in ("a:", "b:")]
    for val_fraction in (1e-9, 1 - 1e-9):
        splits = split_pairs(read_pairs(write_lines(tmp_path / "two.jsonl", *two)), val_fraction)
        train, val = ({p.prompt for p in splits[k]} for k in ("train", "val"))
        assert len(train) == len(val) == 1 and not train & val and len(splits["val"]) == 50


# --- the loss mask and packing ---

def expected_targets(prompt: str, response: str, loss_on_prompt: bool) -> list[int]:
    """The targets of one example, from its texts alone: y[i] predicts token i + 1."""
    ids = TOK.encode(prompt) + TOK.encode(response) + [TOK.eot_id]
    first_trained = 1 if loss_on_prompt else len(prompt)
    return [ids[i + 1] if i + 1 >= first_trained else -1 for i in range(len(ids) - 1)]


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_targets_are_the_response_and_its_end_of_text(pairs_file, loss_on_prompt):
    rows = rows_of(pairs_file, 64, loss_on_prompt=loss_on_prompt, pack_rows=False)  # one example per row
    pairs = read_pairs(pairs_file)
    assert len(rows) == len(pairs) and rows.truncated == 0
    for r, pair in enumerate(pairs):
        want = expected_targets(pair.prompt, pair.response, loss_on_prompt)
        assert rows.y[r, :len(want)].tolist() == want
        assert (rows.y[r, len(want):] == -1).all()  # padding trains nothing
        assert rows.x[r, :len(want)].tolist() == (TOK.encode(pair.prompt) + TOK.encode(pair.response))
        assert rows.n_targets[r] == sum(t >= 0 for t in want)


def test_packing_keeps_examples_whole_and_in_order(pairs_file):
    packed, single = rows_of(pairs_file, 64, pack_rows=True), rows_of(pairs_file, 64)
    assert len(packed) < len(single) / 1.5
    assert packed.total_targets == single.total_targets
    # Reading the rows back, example by example, gives every example's targets in file order.
    def stream(rows):
        return [t for r in range(len(rows)) for t in rows.y[r].tolist() if t >= 0]
    assert stream(packed) == stream(single)
    # Each row starts with an example's first token: no example is split across two rows.
    firsts = {int(e.prompt[0]) for e in packed.examples}
    assert all(int(row[0]) in firsts for row in packed.x)


def test_over_long_examples_are_cut_and_counted(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", json.dumps({"prompt": "ab:", "response": "x" * 40}),
                       json.dumps({"prompt": "a" * 40, "response": "y"}), json.dumps({"prompt": "b", "response": "z"}))
    tok = CharTokenizer(list("abxyz:"), end_of_text=True)
    rows = pack(encode_pairs(read_pairs(path), tok), 16, tok.eot_id)
    assert (rows.truncated, rows.dropped) == (2, 1)  # the second had no response within 17 tokens
    assert rows.total_targets == (17 - 3) + 2  # 14 x's of the first, then "z" and end-of-text
    with user_error("no example has a target within block_size + 1 = 5 tokens"):
        pack(encode_pairs(read_pairs(path)[1:2], tok), 4, tok.eot_id)


def test_a_character_outside_a_char_vocabulary_is_named_with_its_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", '{"prompt": "ab", "response": "a"}', '{"prompt": "a", "response": "aQ"}')
    with user_error("line 2", "'Q'"):
        encode_pairs(read_pairs(path), CharTokenizer(list("ab")), path)


# --- batches and the loss ---

def test_row_batches_are_a_pure_function_of_seed_and_step_split_over_ranks_and_micro_steps(pairs_file):
    rows = rows_of(pairs_file, 64)
    whole = get_batch(rows, 8, 64, seed=3, step=5)
    assert torch.equal(whole[0], get_batch(rows, 8, 64, seed=3, step=5)[0])
    assert not torch.equal(whole[0], get_batch(rows, 8, 64, seed=3, step=6)[0])
    parts = [get_batch(rows, 2, 64, seed=3, step=5, micro=m, n_micro=2, rank=r, world_size=2)
             for r in range(2) for m in range(2)]
    assert len({x.shape[1] for x, _ in parts}) > 1  # each batch is cut to its longest row
    for k, (x, y) in enumerate(parts):  # the same rows; what a part leaves off is padding
        width = x.shape[1]
        assert torch.equal(x, whole[0][2 * k:2 * k + 2, :width]) and torch.equal(y, whole[1][2 * k:2 * k + 2, :width])
        assert (whole[1][2 * k:2 * k + 2, width:] == -1).all()
    counts = step_targets(rows, 2, seed=3, step=5, n_micro=2, world_size=2)
    assert counts.tolist() == [int((y >= 0).sum()) for _, y in parts]
    assert step_targets([np.arange(100)], 2, seed=3, step=5) is None


def step_gradients(cfg: ModelConfig, rows: PackedRows) -> dict[str, torch.Tensor]:
    """The gradients train_step leaves for step 0 from the same initial weights."""
    torch.manual_seed(0)
    model = LanguageModel(cfg, TOK.vocab_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, optimizer, rows, 0, cfg, scaler=torch.amp.GradScaler("cpu", enabled=False),
               ctx=contextlib.nullcontext(), device=CPU)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_accumulated_micro_batches_equal_the_big_batch_though_their_targets_differ(tiny_cfg, pairs_file, packed):
    cfg = dataclasses.replace(tiny_cfg, block_size=32, grad_clip=0.0)
    rows = rows_of(pairs_file, pack_rows=packed)
    counts = step_targets(rows, 2, seed=cfg.seed, step=0, n_micro=4)
    assert len(set(counts.tolist())) > 1  # the micro-batches hold different numbers of response tokens
    big = step_gradients(dataclasses.replace(cfg, batch_size=8), rows)
    for batch, accum in ((4, 2), (2, 4)):
        small = step_gradients(dataclasses.replace(cfg, batch_size=batch, grad_accum_steps=accum), rows)
        for name in big:
            torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-7)
    # The mean of the micro-batches' means, the usual recipe, would not be the same step.
    torch.manual_seed(0)
    model = LanguageModel(cfg, TOK.vocab_size)
    for m in range(4):
        x, y = get_batch(rows, 2, 32, seed=cfg.seed, step=0, micro=m, n_micro=4)
        (model(x, y)[1] / 4).backward()
    naive = dict(model.named_parameters())["transformer.wte.weight"].grad
    assert (naive - big["transformer.wte.weight"]).abs().max() > 1e-4


def test_the_gradient_is_the_mean_over_response_tokens_of_the_step(tiny_cfg, pairs_file):
    """Against a reference that scores each example on its own and never reads a prompt's target."""
    cfg = dataclasses.replace(tiny_cfg, block_size=64, batch_size=6, grad_clip=0.0)
    rows = rows_of(pairs_file, 64, pack_rows=False)
    got = step_gradients(cfg, rows)
    torch.manual_seed(0)
    model = LanguageModel(cfg, TOK.vocab_size)
    picked = np.random.default_rng([cfg.seed, 0, 0]).integers(0, len(rows), size=6)  # get_batch's draw
    total, n = 0.0, 0
    for r in picked:
        example = rows.examples[r]
        ids = torch.tensor(np.concatenate([example.prompt, example.response, [TOK.eot_id]]))
        logits = model(ids[None, :-1])[0][0]  # (T, V)
        answer = slice(len(example.prompt) - 1, None)  # the positions that predict the response and the end
        total = total + F.cross_entropy(logits[answer], ids[1:][answer], reduction="sum")
        n += len(ids) - len(example.prompt)
    (total / n).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_on_prompt", [False, True])
def test_changing_a_prompt_tokens_target_changes_no_gradient(tiny_cfg, pairs_file, loss_on_prompt):
    cfg = dataclasses.replace(tiny_cfg, block_size=64, batch_size=4, grad_clip=0.0)
    rows = rows_of(pairs_file, 64, loss_on_prompt=loss_on_prompt, pack_rows=False)
    labels = rows_of(pairs_file, 64, loss_on_prompt=True, pack_rows=False).y  # every target, prompt's too
    in_prompt = np.zeros_like(labels, dtype=bool)
    for r, example in enumerate(rows.examples):
        in_prompt[r, :len(example.prompt) - 1] = True  # targets that are prompt tokens
    assert (labels[in_prompt] >= 0).all() and ((rows.y[in_prompt] >= 0).all() == loss_on_prompt)
    changed = rows.y.copy()
    changed[in_prompt & (changed >= 0)] = (labels[in_prompt & (changed >= 0)] + 1) % TOK.eot_id
    before = step_gradients(cfg, rows)
    after = step_gradients(cfg, dataclasses.replace(rows, y=changed))
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same != loss_on_prompt  # exactly equal without the prompt in the loss; different with it


# --- generated tasks ---

# The bytes of each task's file, the same on every machine; a new task adds its hash here.
TASK_SHA256 = {"reverse_words": "b3a000893671596f61e93efd386d73e847bb5835487484588f41b6623c629432",
               "sort_words": "c5af6b5a701d97ed238af038caa9991709d7391ec8ae2b504ad5308327814898"}


def test_tasks_are_pinned_distinct_and_in_shakespeares_characters():
    shakespeare_chars = set("\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz")
    for name in TASKS:
        data = task_bytes(name)
        assert hashlib.sha256(data).hexdigest() == TASK_SHA256[name]
        pairs = [json.loads(line) for line in data.splitlines()]
        assert len({p["prompt"] for p in pairs}) == len(pairs) == TASKS[name].n_pairs
        assert set("".join(p["prompt"] + p["response"] for p in pairs)) <= shakespeare_chars
    prompt, response = generate("reverse_words")[0]
    assert response == prompt.removeprefix("reverse: ").removesuffix("\n")[::-1]


def test_a_task_name_writes_its_file_and_keeps_it_true(tmp_path):
    cfg = ModelConfig(data="reverse_words", data_dir=str(tmp_path), block_size=32).validate()
    corpus = prepare_corpus(cfg)
    path = tmp_path / "tasks" / "reverse_words.jsonl"
    assert corpus.kind == "pairs" and corpus.name == str(path)
    assert corpus.tokenizer.eot_id == corpus.tokenizer.vocab_size - 1
    mtime = path.stat().st_mtime_ns
    notes: list[str] = []
    assert ensure_task("reverse_words", path, notes) and not notes and path.stat().st_mtime_ns == mtime  # kept as it was
    path.write_text('{"prompt": "reverse: ab\\n", "response": "ba"}\n' * 3)  # e.g. an older tasks.py's
    ensure_task("reverse_words", path, notes)
    assert "written again" in notes[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == corpus.sha256


def test_grow_vocab_appends_mean_rows_and_keeps_the_rest():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8).validate()
    model = LanguageModel(cfg, 5)
    grown = LanguageModel(cfg, 6)
    grown.load_state_dict(grow_vocab(model.state_dict(), 6))
    wte = grown.transformer.wte.weight
    assert torch.equal(wte[:5], model.transformer.wte.weight)
    torch.testing.assert_close(wte[5], model.transformer.wte.weight.mean(0))
    assert grown.lm_head.weight is wte  # still tied


# --- train.py, inference.py ---

def test_fine_tuning_a_char_model_on_pairs_end_to_end(trained_run, tmp_path):
    """The shared run's char vocabulary has no end-of-text id: fine-tuning adds one and trains on the
    responses (here always "ok"), and inference continues a prompt and stops at the end-of-text."""
    pairs = [json.dumps({"prompt": f"{a} {b}:\n", "response": "ok"})
             for a in TINY_TEXT.split()[:12] for b in TINY_TEXT.split()[12:24]]
    common = ("--data", str(write_lines(tmp_path / "ok.jsonl", *pairs)), "--runs-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--max-iters", "150", "--eval-interval", "50",
              "--warmup-iters", "0", "--sample-length", "30", "--learning-rate", "1e-2", "--batch-size", "8")
    res = call_main(train.main, "--init-from", str(trained_run), *common)
    assert res.returncode == 0, res.stderr
    assert "added id" in res.stdout and "prompt/response pairs" in res.stdout
    assert "samples answer the first held-out prompt" in res.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    tokenizer = json.loads((run_dir / "artifacts" / "export" / "tokenizer.json").read_text())
    assert tokenizer["end_of_text"] is True
    prompt = f"{TINY_TEXT.split()[0]} {TINY_TEXT.split()[13]}:\n"
    out = call_main(inference.main, "--run", str(run_dir), "--prompt", prompt, "--temperature", "0",
                    "--max-new-tokens", "200")
    assert out.stdout == prompt + "ok\n"  # the answer, then the end-of-text ended the sample
    assert f"next: python inference.py --run {run_dir} --prompt $'" in res.stdout and "--temperature 0" in res.stdout
    with user_error("line 1", "'Q'"):
        call_main(train.main, "--init-from", str(trained_run), *common[2:], "--data",
                  str(write_lines(tmp_path / "bad.jsonl", '{"prompt": "Q", "response": "a"}',
                                  '{"prompt": "a", "response": "a"}')))

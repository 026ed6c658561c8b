"""The batched decoding engine: sequences decoded together give each one's own model.generate tokens
(greedy and seeded sampling, past block_size, every block family, blocks of your own), stop strings,
end-of-text, cancelling, timeouts, echo logprobs, a full queue."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from model import LanguageModel
from parameters import ModelConfig
from serving.engine import TIMEOUT, Engine, Event, QueueFull, Sampling, Sequence
from tokenizer import build_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


class Collector:
    """Events of several sequences, by index; done() waits until every one has finished."""

    def __init__(self, n: int) -> None:
        self.events: dict[int, list[Event]] = {i: [] for i in range(n)}
        self.finished = threading.Semaphore(0)

    def emit(self, i: int):
        def take(ev: Event) -> None:
            self.events[i].append(ev)
            if ev.finish or ev.error:
                self.finished.release()
        return take

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.finished.acquire(timeout=timeout), "a sequence never finished"

    def text(self, i: int) -> str:
        return "".join(ev.text for ev in self.events[i])


def make(arch: str = "gpt2", block_size: int = 16, end_of_text: bool = False) -> tuple[LanguageModel, object]:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, block_size=block_size,
                      n_kv_head=2 if arch == "llama" else 0)
    tok = build_tokenizer("char", ALPHABET, end_of_text=end_of_text)
    # float64: rows decoded in a batch and alone then agree to the last bit that matters for argmax
    return LanguageModel(cfg, tok.vocab_size).double().eval(), tok


def run(engine: Engine, prompts: list[list[int]], samplings: list[Sampling]) -> Collector:
    out = Collector(len(prompts))
    engine.submit([Sequence(p, s, out.emit(i)) for i, (p, s) in enumerate(zip(prompts, samplings))])
    out.wait(len(prompts))
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequences_decoded_together_equal_each_alone(arch: str):
    model, tok = make(arch)
    engine = Engine(model, tok, torch.device("cpu"), max_batch=4, max_queue=64)
    # more sequences than rows (they wait, then take freed rows), prompts past block_size, 40 tokens each
    # (past block_size: the window rule's re-prefill), greedy and seeded sampling mixed
    prompts = [[1, 2, 3], [4] * 20, [5, 6], [7, 8, 9, 10, 11], [0], [3] * 12]
    samplings = [Sampling(max_tokens=40, temperature=0.0 if i % 2 == 0 else 0.9, top_k=5 if i % 3 == 0 else 0,
                          top_p=0.9 if i == 5 else 1.0, seed=i) for i in range(len(prompts))]
    out = run(engine, prompts, samplings)
    for i, (p, s) in enumerate(zip(prompts, samplings)):
        g = torch.Generator().manual_seed(s.seed)
        ref = model.generate(torch.tensor([p]), 40, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             generator=g)[0, len(p):]
        assert out.text(i) == tok.decode(ref), i
        assert out.events[i][-1].finish == "length" and out.events[i][-1].completion_tokens == 40
    assert engine.load()["active"] == 0 and engine.load()["waiting"] == 0


def test_blocks_of_your_own_decode_one_row_at_a_time():
    model, tok = make()
    engine = Engine(model, tok, torch.device("cpu"), max_batch=3, max_queue=8)
    engine.batched = False  # what a model whose blocks are not CausalSelfAttention gets
    prompts = [[1, 2], [3, 4, 5], [6]]
    out = run(engine, prompts, [Sampling(max_tokens=30, temperature=0.0)] * 3)
    for i, p in enumerate(prompts):
        assert out.text(i) == tok.decode(model.generate(torch.tensor([p]), 30, temperature=0.0)[0, len(p):])


def test_stop_strings_end_the_text_before_them_and_are_never_given_out():
    model, tok = make()
    engine = Engine(model, tok, torch.device("cpu"), max_batch=2, max_queue=8)
    full = run(engine, [[1, 2, 3]], [Sampling(max_tokens=30, temperature=0.0)]).text(0)
    stop = full[10:13]  # three characters: held back over three tokens before it is known
    out = run(engine, [[1, 2, 3]], [Sampling(max_tokens=30, temperature=0.0, stop=("zzzzzz", stop))])
    assert out.text(0) == full[:full.index(stop)] and out.events[0][-1].finish == "stop"
    pieces = "".join(ev.text for ev in out.events[0])
    assert stop not in pieces


def test_end_of_text_ends_a_sequence_with_stop():
    model, tok = make(end_of_text=True)
    plain = model.next_logits
    model.next_logits = lambda *args: plain(*args).index_add(  # the model ends every document at once
        1, torch.tensor([tok.eot_id]), torch.full((1, 1), 1e4, dtype=torch.float64))
    engine = Engine(model, tok, torch.device("cpu"), max_batch=2, max_queue=8)
    out = run(engine, [[1, 2]], [Sampling(max_tokens=30, temperature=0.7, logprobs=0)])
    (last,) = out.events[0]
    assert last.finish == "stop" and last.text == "" and last.completion_tokens == 1
    assert last.tokens[0].id == tok.eot_id  # logprobs list the end-of-text token that ended it


def test_echo_logprobs_are_the_models_log_softmax_and_max_tokens_zero_only_scores():
    model, tok = make(block_size=8)
    engine = Engine(model, tok, torch.device("cpu"), max_batch=2, max_queue=8)
    prompt = [1, 5, 2, 7, 3, 3, 4, 9, 6]  # block_size + 1 tokens: all scored, the first has no logprob
    out = run(engine, [prompt], [Sampling(max_tokens=0, echo=True, logprobs=2)])
    (echo, end) = out.events[0]
    assert echo.text == tok.decode(prompt) and end.finish == "length" and end.completion_tokens == 0
    with torch.no_grad():
        ref = F.log_softmax(model(torch.tensor([prompt[:8]]))[0][0].float(), dim=-1)  # (8, V)
    assert echo.tokens[0].logprob is None and [t.id for t in echo.tokens] == prompt
    for i, t in enumerate(echo.tokens[1:]):
        assert t.logprob == pytest.approx(float(ref[i, prompt[i + 1]]), abs=1e-6)
        assert max(t.top.values()) == pytest.approx(float(ref[i].max()), abs=1e-6) and len(t.top) <= 2


def test_cancelled_and_timed_out_sequences_free_their_rows():
    model, tok = make()
    engine = Engine(model, tok, torch.device("cpu"), max_batch=1, max_queue=8)
    out = Collector(3)
    long = Sequence([1], Sampling(max_tokens=10**6, temperature=0.0), out.emit(0))
    late = Sequence([2], Sampling(max_tokens=5, temperature=0.0), out.emit(1), deadline=time.monotonic() + 0.2)
    after = Sequence([3], Sampling(max_tokens=5, temperature=0.0), out.emit(2))
    engine.submit([long, late, after])
    deadline = time.monotonic() + 30
    while not out.events[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # `late` waits behind `long` past its deadline
    engine.cancel([long])
    out.wait(2)
    assert out.events[1][-1].error == TIMEOUT
    assert out.events[2][-1].finish == "length" and len(out.text(2)) == 5
    assert not any(ev.finish or ev.error for ev in out.events[0])  # a cancelled sequence just stops
    assert engine.load()["active"] == 0


def test_a_full_queue_refuses_the_whole_request():
    model, tok = make()
    engine = Engine(model, tok, torch.device("cpu"), max_batch=1, max_queue=2)
    gate = threading.Event()
    with engine.wake:  # hold the engine so that nothing leaves the queue
        engine.submit([Sequence([1], Sampling(max_tokens=1), lambda ev: gate.set())])
        with pytest.raises(QueueFull, match="max_queue 2"):
            engine.submit([Sequence([1], Sampling(max_tokens=1), lambda ev: None) for _ in range(2)])
    assert gate.wait(30)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_speculation_gives_greedy_decodings_text_in_fewer_steps(arch: str):
    model, tok = make(arch, block_size=32)
    engine = Engine(model, tok, torch.device("cpu"), max_batch=2, max_queue=8, speculate=6)
    prompt = tok.encode("abc abc abc abc ab")  # repeats: the lookup drafts from it
    for max_tokens, stop in [(60, ()), (7, ()), (60, ("q",))]:  # past block_size; ending mid-draft; a stop string
        steps = engine.steps
        out = run(engine, [prompt], [Sampling(max_tokens=max_tokens, temperature=0.0, stop=stop)])
        ref = tok.decode(model.generate(torch.tensor([prompt]), max_tokens, temperature=0.0)[0, len(prompt):])
        expected = ref[:ref.index(stop[0])] if stop and stop[0] in ref else ref
        assert out.text(0) == expected, (max_tokens, stop)
        if max_tokens == 60 and not stop:
            assert engine.steps - steps < 60  # drafts were taken: fewer steps than tokens
    assert Engine._lookup([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1] and Engine._lookup([5, 6, 7], 3) == []

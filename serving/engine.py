"""The decoding engine behind serve.py: sequences that arrive together are decoded together.

    engine = Engine(model, tokenizer, device, max_batch=16, max_queue=256)
    engine.submit([Sequence(prompt_ids, Sampling(max_tokens=50), emit=callback, deadline=...)])

One thread owns the model. Each step it
1. admits waiting sequences while a row of the batch is free, prefilling each prompt into its own
   row of a BatchKV cache (architectures/layers.py);
2. samples every active sequence's next token with that sequence's own settings and generator, and
   hands the new text to its emit callback;
3. runs one forward for every row still going, each row at its own position.
A finished, cancelled or timed-out sequence frees its row at once, so a waiting one takes it at the
next step (continuous batching, as in Orca, Yu et al. OSDI 2022, and vLLM). Past block_size a row
follows model.py's window rule: it is re-prefilled from its last block_size // 2 tokens. A model with
blocks of your own (not model.flexible_cache) decodes its rows one at a time, each with its own cache.

Sampling draws from a generator per sequence (seed, or a random one) exactly as model.generate does,
so a lone sequence gives inference.py's tokens for the same seed. The HTTP side never waits on the
model and the model never waits on a client: emit must return at once (serve.py's puts the event in
the request's queue), so a slow reader only lets its own queue grow.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from architectures import BatchKV, LayerKV, start_step
from model import LanguageModel, sample_next
from tokenizer import TextStream, Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How one sequence is generated: the request's settings, already checked by the API."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    logprobs: int | None = None  # alternatives listed per token (0: only the chosen token's); None: none
    echo: bool = False  # the prompt comes first in the text (with its logprobs, if asked)


class Token(NamedTuple):
    """One token of a result with its log-probability under the model (None for a prompt's first)."""
    id: int
    text: str
    logprob: float | None
    top: dict[str, float] | None  # the most likely tokens at its position, with their logprobs


class Event(NamedTuple):
    """What a sequence produced since its last event: text, the tokens it came from (when logprobs
    were asked), and at the end the finish reason ("stop", "length") or an error."""
    text: str
    tokens: list[Token]
    finish: str | None = None
    error: str | None = None
    completion_tokens: int = 0  # tokens generated so far


TIMEOUT = "timeout"  # Event.error of a sequence that ran past its deadline


class QueueFull(Exception):
    """More sequences are waiting than max_queue allows."""


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with n > 1 is n of these)."""
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    deadline: float = math.inf  # time.monotonic() past which it ends with an error
    cancelled: bool = False  # set by the API when its client goes away
    # the engine's state
    window: list[int] = field(default_factory=list)  # tokens the next prediction sees (model.py's window)
    logits: torch.Tensor | None = None  # (1, V) for its next token
    generated: int = 0
    kv: list[LayerKV] | None = None  # its own cache, where rows cannot be batched
    generator: torch.Generator | None = None
    text: TextStream | None = None
    held: str = ""  # text not yet given out: it may be the start of a stop string


class Engine:
    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, device: torch.device, *, max_batch: int,
                 max_queue: int, speculate: int = 0) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch, self.max_queue, self.speculate = max_batch, max_queue, speculate
        self.block_size = model.block_size
        self.keep = max(self.block_size // 2, 1)  # model.py's window rule
        self.batched = model.flexible_cache
        self.cache = [BatchKV(max_batch, self.block_size) for _ in range(model.n_layer)]
        self.active: list[Sequence] = []  # row i of the cache is active[i]
        self.waiting: deque[Sequence] = deque()
        self.wake = threading.Condition()
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="gptlab-engine", daemon=True)
        self.thread.start()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences for decoding (all or none: QueueFull when they do not fit)."""
        with self.wake:
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (max_queue {self.max_queue})")
            self.waiting.extend(sequences)
            self.wake.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop these sequences (their client went away): their rows free up at the next step."""
        for seq in sequences:
            seq.cancelled = True
        with self.wake:
            self.wake.notify()

    def load(self) -> dict[str, int]:
        """What /health reports: sequences decoding and waiting, rows, and decode steps taken so far."""
        return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "steps": self.steps}

    # --- the engine thread ---

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.active and not self.waiting:
                        self.wake.wait()
                try:
                    self._admit()
                    self._sample()
                    self._decode()
                except Exception as e:  # a bug or out of memory: fail what is running, keep serving
                    for seq in [*self.active]:
                        self._finish(seq, error=f"the model failed: {type(e).__name__}: {e}")
                    self._drop_finished()
                self.steps += 1

    def _admit(self) -> None:
        now = time.monotonic()
        while True:
            with self.wake:
                if not self.waiting or len(self.active) >= self.max_batch:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled or now > seq.deadline:
                self._end_unstarted(seq)
                continue
            try:
                self._prefill(seq)
            except Exception as e:  # the model failed on this prompt: it alone fails
                if seq in self.active:
                    self._drop_row(self.active.index(seq))
                seq.emit(Event("", [], error=f"the model failed on this prompt: {type(e).__name__}: {e}"))

    def _end_unstarted(self, seq: Sequence) -> None:
        if not seq.cancelled:
            seq.emit(Event("", [], error=TIMEOUT))

    def _prefill(self, seq: Sequence) -> None:
        """Give seq a row and the logits of its first token; with echo, send the prompt first."""
        s = seq.sampling
        seed = s.seed if s.seed is not None else secrets.randbits(63)
        seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        seq.text = TextStream(self.tokenizer)
        seq.window = seq.prompt[-self.block_size:]
        scored = self._score_prompt(seq) if s.echo and s.logprobs is not None else None
        if s.echo:
            tokens = scored[0] if scored else []
            seq.emit(Event(self.tokenizer.decode(seq.prompt), tokens))
        if s.max_tokens == 0:
            seq.emit(Event("", [], finish="length"))
            return
        self.active.append(seq)
        if scored is not None and scored[1] is not None:
            seq.logits = scored[1]  # the scoring forward already predicted the first token
            if s.max_tokens == 1:
                return  # nothing will be decoded after it: no cache needed
        seq.logits = self._prefill_row(seq, len(self.active) - 1)

    def _prefill_row(self, seq: Sequence, row: int) -> torch.Tensor:
        """Prefill seq's window into its row of the cache: the logits (1, V) of the token after it."""
        idx = torch.tensor([seq.window], dtype=torch.long, device=self.device)  # (1, T)
        if self.batched:
            kv = [layer.row(row) for layer in self.cache]
        else:
            kv = seq.kv = [LayerKV(self.block_size) for _ in range(self.model.n_layer)]
        return self.model.next_logits(idx, kv, 0)  # (1, V)

    def _score_prompt(self, seq: Sequence) -> tuple[list[Token], torch.Tensor | None]:
        """The prompt's tokens with their logprobs (echo + logprobs; the API allows at most block_size + 1
        tokens), and the logits of the token after it when that forward saw the whole prompt."""
        prompt = seq.prompt
        idx = torch.tensor([prompt[:self.block_size]], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(idx)[0][0].float()  # (T, V)
        logprobs = F.log_softmax(logits, dim=-1)  # (T, V)
        tokens = [Token(prompt[0], self.tokenizer.decode([prompt[0]]), None, None)]
        tokens += self._tokens(logprobs[:len(prompt) - 1], prompt[1:], seq.sampling.logprobs)
        return tokens, logits[-1:] if len(prompt) <= self.block_size else None

    def _tokens(self, logprobs: torch.Tensor, ids: list[int], top: int) -> list[Token]:
        """Token records for ids, where row i of logprobs (N, V) is the distribution ids[i] was drawn from."""
        chosen = logprobs.gather(1, torch.tensor(ids, device=logprobs.device)[:, None])[:, 0].tolist()
        alternatives = logprobs.topk(top, dim=-1) if top else None
        out = []
        for i, (token, lp) in enumerate(zip(ids, chosen)):
            best = None
            if alternatives is not None:
                values, indices = alternatives.values[i].tolist(), alternatives.indices[i].tolist()
                best = {self.tokenizer.decode([t]): v for t, v in zip(indices, values)}
            out.append(Token(token, self.tokenizer.decode([token]), lp, best))
        return out

    def _sample(self) -> None:
        """Each active sequence's next token, its text given out; finished sequences leave the batch."""
        now = time.monotonic()
        for seq in self.active:
            if seq.cancelled:
                self._finish(seq, silent=True)
            elif now > seq.deadline:
                self._finish(seq, error=TIMEOUT)
            else:
                self._take(seq, self._draw(seq))
        self._drop_finished()

    def _draw(self, seq: Sequence) -> int:
        s = seq.sampling
        token = int(sample_next(seq.logits, s.temperature, s.top_k, s.top_p, seq.generator)[0, 0])
        seq.generated += 1
        return token

    def _take(self, seq: Sequence, token: int) -> None:
        """Add the drawn token to seq's text; end seq at end-of-text, a stop string or max_tokens."""
        s = seq.sampling
        tokens = []
        if s.logprobs is not None:
            tokens = self._tokens(F.log_softmax(seq.logits.float(), dim=-1), [token], s.logprobs)
        if token == self.tokenizer.eot_id:
            self._finish(seq, "stop", tokens)
            return
        seq.held += seq.text.push(token)
        if seq.generated >= s.max_tokens:
            seq.held += seq.text.flush()
        if self._release(seq, tokens):
            return
        if seq.generated >= s.max_tokens:
            self._finish(seq, "length")
            return
        seq.window.append(token)

    def _release(self, seq: Sequence, tokens: list[Token]) -> bool:
        """Give out what of seq.held can no longer be part of a stop string; True when one was found."""
        stops = seq.sampling.stop
        cut = min((i for i in (seq.held.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            seq.held = seq.held[:cut]
            self._finish(seq, "stop", tokens)
            return True
        # Hold back the longest end of the text that begins some stop string.
        keep = max((k for s in stops for k in range(min(len(s) - 1, len(seq.held)), 0, -1)
                    if seq.held.endswith(s[:k])), default=0)
        ready, seq.held = seq.held[:len(seq.held) - keep], seq.held[len(seq.held) - keep:]
        if ready or tokens:
            seq.emit(Event(ready, tokens, completion_tokens=seq.generated))
        return False

    def _finish(self, seq: Sequence, reason: str | None = None, tokens: list[Token] = (), *, error: str | None = None,
                silent: bool = False) -> None:
        seq.logits = None  # marks it finished: _drop_finished frees its row
        seq.cancelled = True
        if not silent:
            text = "" if error else seq.held + seq.text.flush()
            seq.emit(Event(text, list(tokens), reason, error, seq.generated))

    def _drop_finished(self) -> None:
        for row in range(len(self.active) - 1, -1, -1):
            if self.active[row].logits is None:
                self._drop_row(row)

    def _drop_row(self, row: int) -> None:
        """Free a row, moving the last active row into it so that rows 0..B-1 stay the active ones."""
        last = len(self.active) - 1
        if row != last and self.batched:
            for layer in self.cache:
                layer.move(last, row)
        self.active[row] = self.active[last]
        self.active.pop()

    def _decode(self) -> None:
        """One forward for every active row: each row's newest token at its own position; a row whose
        window is full is re-prefilled instead (model.py's window rule)."""
        if self.speculate and len(self.active) == 1 and self.batched and self._speculates(self.active[0]):
            self._drop_finished()
            return
        batch = []
        for row, seq in enumerate(self.active):
            if len(seq.window) > self.block_size:
                seq.window = seq.window[-self.keep:]
                seq.logits = self._prefill_row(seq, row)
            elif not self.batched:
                token = torch.tensor([[seq.window[-1]]], device=self.device)  # (1, 1)
                seq.logits = self.model.next_logits(token, seq.kv, len(seq.window) - 1)  # (1, V)
            else:
                batch.append(row)
        if not batch:
            return
        rows = None if len(batch) == len(self.active) else batch
        seqs = [self.active[row] for row in batch]
        pos = start_step(self.cache, [len(seq.window) - 1 for seq in seqs], rows, self.device)  # (B,)
        tokens = torch.tensor([[seq.window[-1]] for seq in seqs], device=self.device)  # (B, 1)
        logits = self.model.next_logits(tokens, self.cache, pos)  # (B, V)
        for i, seq in enumerate(seqs):
            seq.logits = logits[i:i + 1]  # (1, V)

    def _speculates(self, seq: Sequence) -> bool:
        """Speculative decoding for a lone greedy sequence (prompt lookup: Saxena 2023; transformers'
        prompt_lookup_num_tokens, vLLM's ngram): its last tokens seen earlier in its window draft what
        followed them there, and one forward over the newest token and the drafts checks them all. Each
        draft the model would have chosen itself is taken, and then the model's own next token, so the
        text is greedy decoding's; a step reads the weights once for up to speculate + 1 tokens, which is
        what bounds a single stream. False (nothing done) when there is nothing to draft."""
        s = seq.sampling
        room = self.block_size - len(seq.window)  # the chunk must fit the window
        if s.temperature != 0 or s.logprobs is not None or room <= 0:
            return False
        drafts = self._lookup(seq.window, min(self.speculate, room, s.max_tokens - seq.generated - 1))
        if not drafts:
            return False
        chunk = torch.tensor([[seq.window[-1], *drafts]], device=self.device)  # (1, 1 + K)
        logits = self.model.chunk_logits(chunk, [layer.row(0) for layer in self.cache], len(seq.window) - 1)[0]
        chosen = logits.argmax(dim=-1).tolist()  # (1 + K,): the model's token after each chunk position
        taken = 0
        while taken < len(drafts) and chosen[taken] == drafts[taken]:
            seq.generated += 1
            self._take(seq, drafts[taken])
            taken += 1
            if seq.logits is None:  # it finished (end-of-text, a stop string, max_tokens)
                return True
        seq.logits = logits[taken:taken + 1]  # (1, V): the token after the last one taken
        return True

    @staticmethod
    def _lookup(window: list[int], k: int, longest: int = 3, shortest: int = 2) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the window's last n tokens
        (n = longest, then shorter, down to shortest); [] if none occurred. One repeated token is too
        weak a hint (for a char model, a letter): its drafts cost a wider forward and are mostly wrong
        (on a trained shakespeare_char model, CPU: 2.7 tokens per step with it, 2.6 without, but 340
        tokens/s against 410)."""
        for n in range(longest, shortest - 1, -1):
            tail = window[-n:]
            for start in range(len(window) - n - 1, -1, -1):
                if window[start:start + n] == tail:
                    return window[start + n:start + n + k] if k > 0 else []
        return []

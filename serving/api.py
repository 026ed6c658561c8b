"""serve.py's HTTP side: the OpenAI-compatible routes, the tokenizer routes, /health and the playground.

    app = create_app(engine, tokenizer, cfg, model_id="my-run")    # then uvicorn serves it

Every request becomes one engine Sequence per (prompt, choice); their events come back through a
Mailbox. A refused request gets OpenAI's error object with the status that fits (400 bad
request, 401 key, 404 model or route, 413 body, 503 queue full, 504 timeout, 500 the model failed),
never a traceback. A streaming client that goes away cancels its sequences, which frees their rows.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from parameters import ServeConfig
from serving.engine import TIMEOUT, Engine, Event, QueueFull, Sequence, Token
from serving.protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                              chat_logprobs, completion_logprobs, usage)
from tokenizer import ENDOFTEXT, Tokenizer

PLAYGROUND = Path(__file__).with_name("playground.html")


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLarge
            return message
        try:
            if not length.isdigit() or int(length) > self.limit:
                raise _TooLarge
            await self.app(scope, counted, send)
        except _TooLarge:
            error = ApiError(413, f"the request body is larger than this server accepts ({self.limit:,} bytes; "
                                  "serve.py --max-body-bytes)", kind="request_too_large")
            await JSONResponse(error.body(), error.status)(scope, receive, send)


class _TooLarge(Exception):
    pass


class Mailbox:
    """Events from the engine thread to one request's handler. The engine appends (a deque append is
    atomic) and wakes the event loop only when no wake-up is pending, and, for a non-streaming request,
    only at a sequence's end: a token then costs the loop nothing, which keeps the engine thread from
    contending with it for the interpreter."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every_event: bool) -> None:
        self.loop, self.every_event = loop, every_event
        self.events: collections.deque[tuple[int, Event]] = collections.deque()
        self.ready = asyncio.Event()
        self.waking = False

    def emitter(self, index: int) -> Callable[[Event], None]:
        def emit(ev: Event) -> None:
            self.events.append((index, ev))
            if (self.every_event or ev.finish or ev.error) and not self.waking:
                self.waking = True
                self.loop.call_soon_threadsafe(self._wake)
        return emit

    def _wake(self) -> None:
        self.waking = False
        self.ready.set()

    async def take(self, timeout: float | None = None) -> list[tuple[int, Event]]:
        """The events that arrived (waiting up to timeout seconds for one; [] if none came)."""
        if not self.events:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                return []
        self.ready.clear()
        taken = []
        while self.events:
            taken.append(self.events.popleft())
        return taken


@dataclasses.dataclass
class Choice:
    """What one sequence has produced, gathered for a non-streaming response."""
    text: str = ""
    tokens: list[Token] = dataclasses.field(default_factory=list)
    finish: str | None = None
    completion_tokens: int = 0


def create_app(engine: Engine, tokenizer: Tokenizer, cfg: ServeConfig, model_id: str) -> FastAPI:
    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    created = int(time.time())
    block_size = engine.block_size

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif not where:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        return JSONResponse(ApiError(400, message, ".".join(where) or None).body(), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(ApiError(e.status_code, message, kind=kind).body(), e.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(), 500)

    def authorized(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>` "
                                "(openai clients: api_key=...)", kind="authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if name not in (None, model_id):
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{model_id}' (GET /v1/models)",
                           "model", "not_found_error", "model_not_found")

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "gptlab", "max_model_len": block_size}

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(PLAYGROUND, media_type="text/html; charset=utf-8")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, **engine.load()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/tokenizer_info", dependencies=[Depends(authorized)])
    async def tokenizer_info() -> dict[str, Any]:
        eos = ENDOFTEXT if tokenizer.eot_id is not None else None
        return {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_token": eos,
                "eos_token_id": tokenizer.eot_id, "bos_token": None, "pad_token": None, "max_model_len": block_size}

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        text = req.prompt if req.prompt is not None else req.content
        if text is None:
            raise ApiError(400, "send the text to tokenize as `prompt` (or `content`)", "prompt")
        tokens = encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": block_size}

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        text = tokenizer.decode(check_ids(req.tokens, "tokens"))
        return {"prompt": text, "content": text}

    def encode(text: str) -> list[int]:
        try:
            return tokenizer.encode(text)
        except ValueError as e:  # a character the vocabulary does not have
            raise ApiError(400, str(e), "prompt") from None

    def check_ids(ids: list[int], param: str) -> list[int]:
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})", param)
        return ids

    def prompts_of(prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is an empty list", "prompt")
        return [encode(p) if isinstance(p, str) else check_ids(p, "prompt") for p in prompt]

    def check_prompt(ids: list[int], echo_logprobs: bool) -> list[int]:
        if not ids:  # an empty prompt starts a new document, where the tokenizer can say so
            if tokenizer.eot_id is None:
                raise ApiError(400, "the prompt is empty and this model's tokenizer has no end-of-text token to start "
                                    "from; send at least one character", "prompt")
            ids = [tokenizer.eot_id]
        if len(ids) > cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, more than this server accepts "
                                f"({cfg.max_prompt_tokens}; serve.py --max-prompt-tokens)", "prompt",
                           code="context_length_exceeded")
        if echo_logprobs and len(ids) > block_size + 1:
            raise ApiError(400, f"echo with logprobs scores at most block_size + 1 = {block_size + 1} prompt tokens; "
                                f"this prompt has {len(ids)} (lm-eval: max_length={block_size + 2})", "prompt",
                           code="context_length_exceeded")
        return ids

    def start(prompts: list[list[int]], n: int, sampling: Any, stream: bool) -> tuple[Mailbox, list[Sequence]]:
        """Queue one Sequence per (prompt, choice); choice j of a seeded request uses seed + j."""
        if n > cfg.max_n:
            raise ApiError(400, f"n is {n}, more than this server allows ({cfg.max_n}; serve.py --max-n)", "n")
        mailbox = Mailbox(asyncio.get_running_loop(), every_event=stream)
        deadline = time.monotonic() + cfg.request_timeout
        seqs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                s = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + j)
                seqs.append(Sequence(ids, s, mailbox.emitter(i * n + j), deadline=deadline))
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy ({e}); retry shortly", kind="server_overloaded") from None
        return mailbox, seqs

    def failed(ev: Event) -> ApiError:
        if ev.error == TIMEOUT:
            return ApiError(504, f"the request took longer than {cfg.request_timeout:g} s (serve.py --request-timeout)",
                            kind="timeout")
        return ApiError(500, ev.error, kind="server_error")

    async def gather(request: Request, mailbox: Mailbox, seqs: list[Sequence]) -> list[Choice] | None:
        """Every sequence's whole result; None if the client went away first (its sequences cancelled)."""
        choices = [Choice() for _ in seqs]
        remaining = len(seqs)
        try:
            while remaining:
                events = await mailbox.take(timeout=0.5)
                if not events and await request.is_disconnected():
                    return None
                for index, ev in events:
                    if ev.error:
                        raise failed(ev)
                    c = choices[index]
                    c.text += ev.text
                    c.tokens += ev.tokens
                    if ev.finish:
                        c.finish, c.completion_tokens = ev.finish, ev.completion_tokens
                        remaining -= 1
            return choices
        finally:
            engine.cancel(seqs)  # a no-op for finished ones

    async def sse(mailbox: Mailbox, seqs: list[Sequence], chunk: Callable[[int, Event], dict | None],
                  prompt_tokens: int, include_usage: bool, head: dict, first: list[dict] = ()) -> AsyncIterator[str]:
        """Server-Sent Events: each event's chunk, usage on the last one, then [DONE]. Cancelled when the
        client goes away (starlette cancels the response), which cancels its sequences."""
        try:
            for c in first:
                yield f"data: {json.dumps(c)}\n\n"
            remaining, generated = len(seqs), 0
            while remaining:
                lines = []
                for index, ev in await mailbox.take():
                    if ev.error:
                        yield "".join(lines) + f"data: {json.dumps(failed(ev).body())}\n\ndata: [DONE]\n\n"
                        return
                    body = chunk(index, ev)
                    if ev.finish:
                        remaining -= 1
                        generated += ev.completion_tokens
                        if not remaining:
                            body["usage"] = usage(prompt_tokens, generated)
                    if body:
                        lines.append(f"data: {json.dumps(body)}\n\n")
                if lines:
                    yield "".join(lines)
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, generated)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(seqs)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        sampling = req.sampling(cfg.max_tokens)
        echo_logprobs = req.echo and req.logprobs is not None
        prompts = [check_prompt(p, echo_logprobs) for p in prompts_of(req.prompt)]
        prompt_tokens = sum(len(p) for p in prompts)
        mailbox, seqs = start(prompts, req.n, sampling, req.stream)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                         "model": model_id}
        if req.stream:
            offsets = [0] * len(seqs)

            def chunk(index: int, ev: Event) -> dict | None:
                if not (ev.text or ev.tokens or ev.finish):
                    return None
                logprobs = completion_logprobs(ev.tokens, offsets[index]) if req.logprobs is not None else None
                offsets[index] += len(ev.text)
                return {**head, "choices": [{"index": index, "text": ev.text, "logprobs": logprobs,
                                                      "finish_reason": ev.finish}]}
            return stream_response(sse(mailbox, seqs, chunk, prompt_tokens, req.include_usage, head))
        choices = await gather(request, mailbox, seqs)
        if choices is None:
            return JSONResponse({}, 499)
        return {**head, "choices": [
            {"index": i, "text": c.text, "finish_reason": c.finish,
             "logprobs": completion_logprobs(c.tokens) if req.logprobs is not None else None}
            for i, c in enumerate(choices)], "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        sampling = req.sampling(cfg.max_tokens)
        prompt = check_prompt(encode(req.prompt()), False)
        mailbox, seqs = start([prompt], req.n, sampling, req.stream)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id}
        if req.stream:
            head = {**head, "object": "chat.completion.chunk"}

            def chunk(index: int, ev: Event) -> dict | None:
                if not (ev.text or ev.tokens or ev.finish):
                    return None
                delta = {"content": ev.text} if ev.text or not ev.finish else {}
                logprobs = chat_logprobs(ev.tokens) if req.logprobs else None
                return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                             "finish_reason": ev.finish}]}
            roles = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]} for i in range(len(seqs))]
            return stream_response(sse(mailbox, seqs, chunk, len(prompt), req.include_usage, head, roles))
        choices = await gather(request, mailbox, seqs)
        if choices is None:
            return JSONResponse({}, 499)
        return {**head, "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
             "logprobs": chat_logprobs(c.tokens) if req.logprobs else None}
            for i, c in enumerate(choices)], "usage": usage(len(prompt), sum(c.completion_tokens for c in choices))}

    return app


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

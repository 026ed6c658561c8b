"""The OpenAI wire format: request bodies as pydantic models, checked against the model and the
server's limits, and the response objects built from the engine's tokens.

Requests follow OpenAI's /v1/completions and /v1/chat/completions (and llama.cpp's and vLLM's
extensions: top_k, /tokenize, /detokenize). Fields a client may send that change nothing here (user,
a zero penalty) are accepted; fields that would change the result but are not implemented
(penalties, logit_bias, best_of, suffix, tools) are refused, never ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.engine import Sampling, Token

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat top_logprobs allows


class ApiError(Exception):
    """A request the server refuses: becomes {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # an extension (llama.cpp, vLLM): 0 disables
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server; leave it at 0", name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", "stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def sampling(self, cap: int) -> Sampling:
        self.check_unsupported()
        if self.best_of not in (None, self.n):
            raise ApiError(400, "best_of is not supported by this server; ask for n completions instead", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server", "suffix")
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        if max_tokens > cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, more than this server allows ({cap}; serve.py --max-tokens)",
                           "max_tokens")
        return Sampling(max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stops(), self.logprobs, self.echo)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.get("type") != "text" for part in self.content):
            raise ApiError(400, "only text content parts are supported (no images or audio)", "messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    def sampling(self, cap: int) -> Sampling:
        self.check_unsupported()
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", "tools")
        max_tokens = self.max_completion_tokens or self.max_tokens or cap  # until end-of-text, by default
        if max_tokens > cap:
            raise ApiError(400, f"max_tokens is {max_tokens}, more than this server allows ({cap}; serve.py --max-tokens)",
                           "max_tokens")
        top = (self.top_logprobs or 0) if self.logprobs else None
        return Sampling(max_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.stops(), top)

    def prompt(self) -> str:
        """The one layout gptlab's fine-tuning trains (corpus/pairs.py): a prompt, then the response
        and end-of-text. So a chat is one user message; anything a single pair cannot hold is refused."""
        rule = ("this model was fine-tuned on single prompt/response pairs, so it takes exactly one user "
                "message")
        for m in self.messages:
            if m.role in ("system", "developer") and m.text().strip():
                raise ApiError(400, f"{rule}: drop the {m.role} message (or put its text in the user message)",
                               "messages")
            if m.role in ("assistant", "tool"):
                raise ApiError(400, f"{rule}: multi-turn conversations (an {m.role} message) are not supported; "
                                    "send the last user message alone", "messages")
        users = [m for m in self.messages if m.role == "user"]
        if len(users) != 1:
            raise ApiError(400, f"{rule}; got {len(users)}", "messages")
        return users[0].text()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str | None = None  # vLLM's name (lm-eval's remote tokenizer sends it)
    content: str | None = None  # llama.cpp's name
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def completion_logprobs(tokens: list[Token], start: int = 0) -> dict[str, list]:
    """OpenAI's completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, at = [], start
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[Token]) -> dict[str, list]:
    """OpenAI's chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(k, v) for k, v in (t.top or {}).items()]}
                        for t in tokens]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

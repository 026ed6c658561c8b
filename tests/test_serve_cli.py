"""serve.py end to end, through real clients on a live server: the openai package (completions,
streaming, chat, logprobs), lm-eval's local-completions, headless Chromium on the playground, raw
HTTP for every class of bad request, the API key, a client that goes away mid-stream, and 16
clients at once."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx2 as httpx  # the HTTP client the openai package uses (a fork of httpx)
import pytest
import torch
import torch.nn.functional as F

import inference
from conftest import REPO, benchmark_scores, call_main, run_cli, start_cli, wait_for_line, write_benchmarks
from rundir.export import load_export

openai = pytest.importorskip("openai")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    def client(self, api_key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def post(self, path: str, body: object = None, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60, **kw)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[Server]:
    yield from serve(trained_run, "--max-prompt-tokens", "500")


def serve(run: Path, *args: str) -> Iterator[Server]:
    proc = start_cli("serve.py", "--run", str(run), "--port", "0", "--device", "cpu", *args)
    try:
        line = wait_for_line(proc, "serving on", timeout=120)[-1]
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
        yield Server(proc, re.search(r"http://\S+", line).group(0))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def inference_text(run: Path, prompt: str, *args: str) -> str:
    res = call_main(inference.main, "--run", str(run), "--prompt", prompt, "--device", "cpu", *args)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(prompt) and res.stdout.endswith("\n")
    return res.stdout[len(prompt):-1]


def test_openai_client_completes_and_streams_as_inference_py(server: Server, trained_run: Path):
    client = server.client()
    (model,) = client.models.list().data
    assert model.id == trained_run.name
    kw = dict(model=model.id, prompt="All:", max_tokens=40, temperature=0)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert whole.choices[0].text == streamed == inference_text(trained_run, "All:", "--temperature", "0",
                                                              "--max-new-tokens", "40")
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (4, 40, 44)
    # seeded sampling draws inference.py's tokens too (its default top_k is 200)
    sampled = client.completions.create(model=model.id, prompt="All:", max_tokens=40, temperature=0.8, seed=5,
                                        extra_body={"top_k": 200})
    assert sampled.choices[0].text == inference_text(trained_run, "All:", "--seed", "5", "--max-new-tokens", "40")
    # n choices: a seeded request's choice j uses seed + j, so choice 1 is seed 6's text
    two = client.completions.create(model=model.id, prompt="All:", max_tokens=40, temperature=0.8, seed=5, n=2,
                                    extra_body={"top_k": 200})
    assert [c.text for c in two.choices] == [sampled.choices[0].text, inference_text(
        trained_run, "All:", "--seed", "6", "--max-new-tokens", "40")]


def test_openai_client_chats_with_one_user_message(server: Server):
    client = server.client()
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "All:"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=25, temperature=0)
    completion = client.completions.create(model=model, prompt="All:", max_tokens=25, temperature=0)
    assert whole.choices[0].message.content == completion.choices[0].text
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 25
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=25, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == 25 and not chunks[-1].choices
    for bad, words in [([{"role": "user", "content": "All:"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": "All:"}], "multi-turn"),
                       ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "All:"}], "system"),
                       ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "got 2")]:
        with pytest.raises(openai.BadRequestError, match=words) as info:
            client.chat.completions.create(model=model, messages=bad, max_tokens=5)
        assert info.value.status_code == 400 and "one user message" in info.value.message


def test_echo_logprobs_are_the_models(server: Server, trained_run: Path):
    model, tok, _ = load_export(trained_run)
    ids = tok.encode("All:\nSpeak")
    r = server.client().completions.create(model=trained_run.name, prompt=ids, max_tokens=1, echo=True, logprobs=1,
                                           temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith("All:\nSpeak") and lp.tokens[:len(ids)] == list("All:\nSpeak")
    with torch.no_grad():
        ref = F.log_softmax(model(torch.tensor([ids]))[0][0], dim=-1)  # (T, V)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    for i, token in enumerate(ids[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(float(ref[i, token]), abs=1e-5)
        assert max(lp.top_logprobs[i + 1].values()) == pytest.approx(float(ref[i].max()), abs=1e-5)
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=1e-5)  # the greedy token after it


BAD_REQUESTS = [  # (path, body or raw bytes, status, words in the message)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "All:", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "All:", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "All:", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "All:", "max_tokens": 10**6}, 400, "--max-tokens"),
    ("/v1/completions", {"prompt": "All:", "n": 99}, 400, "--max-n"),
    ("/v1/completions", {"prompt": "Zebra"}, 400, "'Z'"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": "All:" * 200}, 400, "--max-prompt-tokens"),
    ("/v1/completions", {"prompt": "All:" * 20, "echo": True, "logprobs": 1}, 400, "block_size + 1"),
    ("/v1/completions", {"prompt": "All:", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": "All:", "presence_penalty": 1}, 400, "not supported"),
    ("/v1/completions", {"prompt": "All:", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "All:", "logprobs": 99}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/completions", {"prompt": "A" * 1_100_000}, 413, "--max-body-bytes"),
    ("/v1/nothing", {}, 404, "no route"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "outside the vocabulary"),
]


def test_every_bad_request_gets_an_openai_error_and_the_server_lives_on(server: Server):
    for path, body, status, words in BAD_REQUESTS:
        if isinstance(body, bytes):
            r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        else:
            r = server.post(path, body)
        assert r.status_code == status, (path, body if len(str(body)) < 200 else "...", r.text)
        error = r.json()["error"]
        assert words in error["message"] and "Traceback" not in r.text, (words, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/completions", timeout=10).status_code == 405
    assert server.health()["status"] == "ok"
    ok = server.post("/v1/completions", {"prompt": "All:", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_tokenize_detokenize_and_tokenizer_info(server: Server, trained_run: Path):
    _, tok, _ = load_export(trained_run)
    ids = server.post("/tokenize", {"prompt": "Speak, speak."}).json()["tokens"]
    assert ids == tok.encode("Speak, speak.") == server.post("/tokenize", {"content": "Speak, speak."}).json()["tokens"]
    assert server.post("/detokenize", {"tokens": ids}).json()["prompt"] == "Speak, speak."
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["vocab_size"] == tok.vocab_size and "eos_token" in info and info["max_model_len"] == 32


def test_the_api_key_is_required_when_set_and_a_slow_request_times_out(trained_run: Path):
    for server in serve(trained_run, "--api-key", "s3cret", "--max-batch", "2", "--request-timeout", "0.3"):
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
        wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            server.client("nope").completions.create(model=trained_run.name, prompt="All:", max_tokens=2)
        r = server.client("s3cret").completions.create(model=trained_run.name, prompt="All:", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert server.health()["status"] == "ok"  # /health and the page stay open for checks
        slow = server.post("/v1/completions", {"prompt": "All:", "max_tokens": 2048},
                           headers={"Authorization": "Bearer s3cret"})
        assert slow.status_code == 504 and "--request-timeout" in slow.json()["error"]["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(server: Server):
    body = {"prompt": "All:", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 20
    while (load := server.health())["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert load["active"] == 0 and load["waiting"] == 0


def test_sixteen_clients_at_once_are_decoded_together(server: Server, trained_run: Path):
    model, tok, _ = load_export(trained_run)
    words = ["All:", "First", "Speak", "You are", "Resolved", "hear", "me", "die"]
    prompts = words + [w.lower() + "." for w in words]  # at most 9 characters: with 20 more, one window
    results: dict[int, str] = {}
    steps_before = server.health()["steps"]

    def ask(i: int) -> None:
        r = server.post("/v1/completions", {"prompt": prompts[i], "max_tokens": 20, "temperature": 0})
        results[i] = r.json()["choices"][0]["text"]
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(16))
    # 16 x 20 tokens one request at a time would take 320 engine steps
    assert server.health()["steps"] - steps_before < 160
    for i, text in results.items():  # each is its own prompt's greedy continuation
        ids = tok.encode(prompts[i] + text)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0][0]  # (T, V)
        start = len(ids) - len(text)
        chosen = logits[start - 1:-1].gather(1, torch.tensor(ids[-len(text):])[:, None])[:, 0]
        assert torch.all(chosen >= logits[start - 1:-1].max(dim=-1).values - 1e-4), i


def test_port_taken_and_bad_flags_are_one_line_errors(trained_run: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = run_cli("serve.py", "--run", str(trained_run), "--port", str(taken.getsockname()[1]))
        assert res.returncode == 2 and "pick another --port" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("serve.py", "--run", str(trained_run), "--max-batch", "0")
    assert res.returncode == 2 and "max_batch" in res.stderr.strip().splitlines()[-1]


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def browse(url: str, script: str, timeout: float = 60) -> object:
    """Open url in headless Chromium, evaluate `script` (an expression; a promise is awaited) and return its
    value: the DevTools protocol over --remote-debugging-pipe (fds 3 and 4), no driver package needed."""
    to_chrome, from_chrome = os.pipe(), os.pipe()

    def fds() -> None:  # in the child: its end of each pipe as fd 3 and fd 4 (moved out of the way first)
        read, write = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome[0], from_chrome[1]))
        os.dup2(read, 3)
        os.dup2(write, 4)
    proc = subprocess.Popen([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                             "--user-data-dir=" + str(Path(os.environ.get("TMPDIR", "/tmp")) / f"chrome-{os.getpid()}"),
                             "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome[0])
    os.close(from_chrome[1])
    reader, buffer, ids = os.fdopen(from_chrome[0], "rb"), b"", iter(range(1, 10**6))

    def message() -> dict:
        nonlocal buffer
        while b"\0" not in buffer:
            chunk = os.read(reader.fileno(), 1 << 16)
            assert chunk, "chromium closed the pipe"
            buffer += chunk
        raw, buffer = buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(method: str, session: str | None = None, **params) -> dict:
        msg_id = next(ids)
        os.write(to_chrome[1], json.dumps({"id": msg_id, "method": method, "params": params,
                                           **({"sessionId": session} if session else {})}).encode() + b"\0")
        while (msg := message()).get("id") != msg_id:
            events.append(msg.get("method"))
        assert "error" not in msg, msg
        return msg["result"]
    events: list[str] = []
    try:
        target = call("Target.createTarget", url="about:blank")["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        call("Page.enable", session)
        call("Page.navigate", session, url=url)
        while "Page.loadEventFired" not in events:
            events.append(message().get("method"))
        result = call("Runtime.evaluate", session, expression=script, awaitPromise=True, returnByValue=True,
                      timeout=timeout * 1000)
        return result["result"].get("value")
    finally:
        proc.kill()
        proc.wait()
        os.close(to_chrome[1])
        reader.close()


@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_the_playground_streams_in_a_headless_browser(server: Server, trained_run: Path):
    expected = server.client().completions.create(model=trained_run.name, prompt="All:", max_tokens=60,
                                                  temperature=0).choices[0].text
    url = f"{server.url}/?prompt=All:&temperature=0&max_tokens=60&run=1"
    page = browse(url, """new Promise((resolve) => {
        const poll = () => /tokens in|error/.test(document.getElementById("stats").textContent)
            ? resolve({output: document.getElementById("output").textContent,
                       stats: document.getElementById("stats").textContent})
            : setTimeout(poll, 50);
        poll();
    })""")
    assert page["output"] == "All:" + expected, page
    assert page["stats"].startswith("60 tokens in") and "first token" in page["stats"] and "finish: length" in page["stats"]


@pytest.mark.slow
def test_lm_eval_local_completions_scores_as_evaluate_py(server: Server, trained_run: Path, tmp_path: Path):
    pytest.importorskip("lm_eval")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from lm_eval_tasks import MC_METRICS, run_lm_eval, write_tasks

    files = write_benchmarks(tmp_path / "files")
    files = {fmt: files[fmt] for fmt in ("hellaswag", "generic")}  # letters the tiny corpus has
    tasks = write_tasks(tmp_path / "tasks", files)
    # max_length = block_size + 2: lm-eval keeps max_length - 1 tokens, evaluate.py block_size + 1;
    # prefix_token_id: the char export has no end-of-text (README: Benchmarks)
    theirs = run_lm_eval(None, tmp_path / "tasks", tasks, tmp_path / "out", server=f"{server.url}/v1 {trained_run.name}",
                         extra_model_args=",max_length=34,prefix_token_id=0")
    for fmt, task in zip(files, tasks):
        ours, lls = benchmark_scores(trained_run, f"{fmt}:{files[fmt]}")
        assert ours["items"] == len(theirs[task]["lls"]) and not ours["skipped"]
        for mine, lm in zip(lls, theirs[task]["lls"], strict=True):
            assert mine == pytest.approx(lm, abs=1e-4), fmt
        assert {m: ours[m] for m in MC_METRICS} == {m: theirs[task][m] for m in MC_METRICS}, fmt

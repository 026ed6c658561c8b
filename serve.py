"""Serve a run's model behind an OpenAI-compatible HTTP API, with a playground page.

    python serve.py                                  # newest run with an export, on http://127.0.0.1:8000
    python serve.py --run runs/<id> --port 8080      # or --checkpoint best, or --run .../checkpoints/step_N
    python serve.py --host 0.0.0.0 --api-key SECRET  # reachable from other machines: require a key

Then: the playground at http://127.0.0.1:8000/, or any OpenAI client:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model=client.models.list().data[0].id, prompt="ROMEO:", max_tokens=100)
Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /tokenize, POST /detokenize,
GET /tokenizer_info, GET /health. Requests that arrive together are decoded together (serving/engine.py).
"""

from __future__ import annotations

import gc
import os
import socket
import sys

import torch

from config import PROJECT_DIR, add_config_arg, parse
from parameters import ServeConfig
from rundir.export import load_for_generation
from rundir.meta import code_note
from utils.cli import run_main
from utils.device import resolve_device


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port is one line at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it every
    # response after a connection's first waited 40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0 picks a free one)"
                         ) from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    cfg = parse(ServeConfig, argv, __doc__, config_dir=None, add_stage_args=add_config_arg).config
    if not cfg.api_key and os.environ.get("GPTLAB_API_KEY"):
        cfg.api_key = os.environ["GPTLAB_API_KEY"]
    sock = listen(cfg.host, cfg.port)
    device = resolve_device(cfg.device)
    # Decoding a token reads every weight once: memory-bound, so a second thread gains little, and one that
    # must wait for the core the HTTP side is on stalls every step (README: Performance).
    torch.set_num_threads(cfg.threads or max(len(os.sched_getaffinity(0)) - 1, 1))
    model, tokenizer, _, loaded, run = load_for_generation(cfg.run, cfg.checkpoint, cfg.runs_dir, device)
    if note := code_note(run.path, PROJECT_DIR):
        print(note, file=sys.stderr)

    import uvicorn  # imported here: the other stages never pay for the web stack

    from serving.api import create_app
    from serving.engine import Engine

    model_id = cfg.model_name or run.path.name
    engine = Engine(model, tokenizer, device, max_batch=cfg.max_batch, max_queue=cfg.max_queue, speculate=cfg.speculate)
    app = create_app(engine, tokenizer, cfg, model_id)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"# {loaded} | {model.num_params() / 1e6:.2f}M parameters | {device}, {torch.get_num_threads()} threads | "
          f"model id '{model_id}'", file=sys.stderr)
    print(f"serving on {url}  |  playground {url}/  |  OpenAI base_url {url}/v1"
          f"{'  |  API key required' if cfg.api_key else ''}", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"warning: {cfg.host} is reachable from other machines and no --api-key is set", file=sys.stderr)
    gc.collect()
    gc.freeze()  # the start-up's objects (torch, fastapi, pydantic) are never collected: no GC pauses over them
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=30))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_main(main)

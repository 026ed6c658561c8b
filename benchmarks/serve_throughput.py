"""serve.py's decoding speed against transformers' generate on the same export, same machine, same minute.

    python benchmarks/serve_throughput.py [--tokens 200] [--clients 8] [--rounds 3] [--n-layer 6 --n-embd 384]
    python benchmarks/serve_throughput.py --run runs/<id> --prompt "ROMEO:" --speculate 8 [--device cuda]

Builds a shakespeare_char-shaped model (random weights: speed does not depend on them; a char vocabulary of
tiny shakespeare, 6 layers, n_embd 384, block 256) and exports it with its Hugging Face folder; starts
serve.py on it (CPU, float32) and, alternating in each round:
- one client: an openai-client completion of --tokens greedy tokens (tokens/s from request to response)
  and, streamed, the time to its first token;
- transformers: AutoModelForCausalLM on the export's hf/ folder, generate(do_sample=False) of as many
  tokens, in this process (float32);
- gptlab's model.generate in this process (what inference.py runs);
- --clients clients at once, each asking for --tokens tokens: total tokens/s.
With --speculate N, serve.py drafts by prompt lookup (a lone greedy request) and transformers gets its
own prompt lookup (prompt_lookup_num_tokens=N) as a second row. With --run, a trained run's export is
used instead of random weights (drafting depends on the text a model writes). Prints the median of each
and the ratios the README's Performance table quotes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import LanguageModel  # noqa: E402
from parameters import ModelConfig  # noqa: E402
from rundir.export import save_export  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def start_server(run: Path, max_batch: int, device: str, speculate: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", "0", "--device",
                             device, "--max-batch", str(max_batch), "--speculate", str(speculate)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={"PYTHONUNBUFFERED": "1", **__import__("os").environ})
    for line in proc.stdout:
        if "serving on" in line:
            return proc, re.search(r"http://\S+", line).group(0)
    raise RuntimeError("serve.py did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--speculate", type=int, default=0)
    p.add_argument("--run", default="", help="a trained run to serve instead of random weights")
    p.add_argument("--prompt", default="\n")
    args = p.parse_args()

    import httpx2 as httpx
    import openai
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device)
    if args.run:
        from rundir.export import load_export
        run = Path(args.run)
        model, tok, cfg = load_export(run, device)
        export = run / "artifacts" / "export"
    else:
        text = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else "".join(map(chr, range(32, 97)))
        tok = build_tokenizer("char", text)
        cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd, block_size=args.block_size,
                          device="cpu", dtype="float32").validate()
        torch.manual_seed(0)
        model = LanguageModel(cfg, tok.vocab_size).eval()
        run = Path(tempfile.mkdtemp(prefix="gptlab_serve_")) / "20260101_000000_bench"  # a run directory's layout
        (run / "meta").mkdir(parents=True)
        export = run / "artifacts" / "export"
        save_export(export, model, cfg.to_dict(), tok.to_dict())
        model = model.to(device)
    hf = AutoModelForCausalLM.from_pretrained(str(export / "hf"), dtype=torch.float32).to(device).eval()
    proc, url = start_server(run, max(args.clients, 16), args.device, args.speculate)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    name = client.models.list().data[0].id
    prompt = args.prompt
    ids = torch.tensor([tok.encode(prompt)], device=device)
    n = args.tokens
    print(f"model: {model.num_params():,} parameters ({cfg.n_layer} layers, n_embd {cfg.n_embd}, block "
          f"{cfg.block_size}, vocab {tok.vocab_size}); {n} greedy tokens from {prompt!r}; float32 on {device}; torch "
          f"threads {torch.get_num_threads()} here, serve.py its own; speculate {args.speculate}")

    def one() -> float:
        t0 = time.perf_counter()
        r = client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0)
        assert r.usage.completion_tokens == n
        return n / (time.perf_counter() - t0)

    def first_token() -> float:
        t0 = time.perf_counter()
        with client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    ttft = time.perf_counter() - t0
                    break
        while httpx.get(f"{url}/health").json()["active"]:  # the closed stream's row is freed
            time.sleep(0.01)
        return ttft

    def transformers_generate(**kw) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
        sync()
        assert out.shape[1] == ids.shape[1] + n
        return n / (time.perf_counter() - t0)

    def gptlab_generate() -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(ids, n, temperature=0.0)
        sync()
        return n / (time.perf_counter() - t0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def many() -> float:
        t0 = time.perf_counter()
        done = []
        threads = [threading.Thread(target=lambda i=i: done.append(client.completions.create(
            model=name, prompt=f"{chr(65 + i)}{prompt}", max_tokens=n, temperature=0).usage.completion_tokens))
            for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done == [n] * args.clients, done
        return args.clients * n / (time.perf_counter() - t0)

    try:
        one(), transformers_generate(), gptlab_generate()  # warm-up
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            lookup = [(f"transformers, prompt lookup {args.speculate} (tok/s)",
                       lambda: transformers_generate(prompt_lookup_num_tokens=args.speculate))] if args.speculate else []
            for key, f in [("serve.py, 1 client (tok/s)", one), ("transformers generate (tok/s)", transformers_generate),
                           *lookup,
                           ("gptlab generate in-process (tok/s)", gptlab_generate),
                           (f"serve.py, {args.clients} clients (total tok/s)", many),
                           ("serve.py time to first token (ms)", lambda: 1000 * first_token())]:
                results.setdefault(key, []).append(f())
        med = {k: statistics.median(v) for k, v in results.items()}
        for k, v in results.items():
            print(f"{k:<40} median {med[k]:>8.1f}   ({', '.join(f'{x:.1f}' for x in v)})")
        single = med["serve.py, 1 client (tok/s)"]
        print(f"serve.py 1 client / transformers: {single / med['transformers generate (tok/s)']:.2f}x; "
              f"{args.clients} clients / 1 client: {med[f'serve.py, {args.clients} clients (total tok/s)'] / single:.2f}x")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()

"""How fast, how lean and how exact prepare_data.py is, on a corpus this script writes itself.

    python benchmarks/prepare_throughput.py                  # 200 MB mixed corpus, default workers
    python benchmarks/prepare_throughput.py --mb 2000        # the 2 GB memory target
    python benchmarks/prepare_throughput.py --startup-only   # only the 1B-token start-up check

It writes a mixed corpus (txt, jsonl, jsonl.zst and parquet files, hundreds of them) from tiny
shakespeare when it is there (else from pydoc's text), then prints:
  - throughput: a plain single-process tiktoken encode_ordinary loop over the same files (timed whole,
    reading and parsing included, and its encode calls alone) against `prepare_data.py --tokenizer
    gpt2` timed from launch to exit, in MB of text per second;
  - ceiling: as many independent loops as workers, at once, each on its share of the files: the
    throughput perfect parallelism would reach on this machine;
  - memory: the peak of the summed RSS of prepare_data.py and all its processes (sampled every 50 ms,
    in a run of its own: sampling costs CPU);
  - correctness: SHA-256 of each split's shards against the baseline's ids (encode_ordinary + 50256 per
    document, split by the documented rule);
  - start-up: seconds from launch to the first step of `train.py --config debug` on shakespeare and on
    a synthetic 1B-token dataset (sparse shards: no disk is filled).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

from corpus.prepare import SPLIT_RULE
from corpus.shards import MANIFEST, write_manifest  # noqa: E402
from tokenizer import gpt2_encoding  # noqa: E402


def source_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from corpus.text import pydoc_text

    return pydoc_text()


def write_corpus(root: Path, megabytes: int, seed: int = 0) -> None:
    """Documents of 1-20 KB cut from the source text at random, in four formats, ~1 MB per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    text, rng = source_text(), random.Random(seed)
    kinds = ["txt", "jsonl", "zst", "parquet"]
    written, n = 0, 0
    while written < megabytes * 1e6:
        kind = kinds[n % 4]
        docs = []
        while sum(map(len, docs)) < 1_000_000:
            start, size = rng.randrange(len(text) - 20_000), rng.randrange(1000, 20_000)
            docs.append(text[start:start + size])
        sub = root / f"part{n // 100:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        if kind == "txt":  # a text file is one document: a big one
            (sub / f"{n:05d}.txt").write_text("".join(docs), encoding="utf-8")
        elif kind == "parquet":
            pq.write_table(pa.table({"text": docs}), sub / f"{n:05d}.parquet")
        else:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
            if kind == "zst":
                (sub / f"{n:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
            else:
                (sub / f"{n:05d}.jsonl").write_bytes(lines)
        written += sum(len(d.encode()) for d in docs)
        n += 1


def plain_documents(path: Path):
    """The documents of a file, read the plain way (no gptlab code)."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8"), hashlib.sha256(path.read_bytes()).digest()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for text in pq.read_table(path, columns=["text"]).column(0).to_pylist():
            yield text, None
    else:
        if path.name.endswith(".zst"):
            import zstandard

            raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 31)
        else:
            raw = path.read_bytes()
        for line in raw.splitlines():
            yield json.loads(line)["text"], None


def baseline(files: list[Path], val_fraction: float = 0.1) -> tuple[float, float, dict[str, str]]:
    """(MB/s of a single-process loop reading, parsing and encode_ordinary-ing every document, MB/s of its
    encode_ordinary calls alone, SHA-256 per split of the shards expected: ids + 50256 per document)."""
    enc, digests = gpt2_encoding(), {"train": hashlib.sha256(), "val": hashlib.sha256()}
    n_bytes, encoding, checking = 0, 0.0, 0.0
    eot = np.array([50256], np.uint16).tobytes()
    start = time.perf_counter()
    for path in files:
        for text, digest in plain_documents(path):
            t0 = time.perf_counter()
            ids = enc.encode_ordinary(text)
            t1 = time.perf_counter()
            data = text.encode()  # from here on: the correctness check, not part of the loop's time
            n_bytes += len(data)
            digest = digest or hashlib.blake2b(data, digest_size=8).digest()
            split = "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"
            digests[split].update(np.array(ids, np.uint16).tobytes() + eot)
            encoding += t1 - t0
            checking += time.perf_counter() - t1
    loop = time.perf_counter() - start - checking
    return n_bytes / 1e6 / loop, n_bytes / 1e6 / encoding, {k: v.hexdigest() for k, v in digests.items()}


def _loop_bytes(files: list[Path]) -> int:
    enc, n_bytes = gpt2_encoding(), 0
    for path in files:
        for text, _ in plain_documents(path):
            enc.encode_ordinary(text)
            n_bytes += len(text.encode())
    return n_bytes


def parallel_ceiling(files: list[Path], processes: int) -> float:
    """MB/s of `processes` independent single-process loops at once, each over its share of the files:
    what perfect parallelism would reach on this machine (cores slow each other down: shared caches,
    memory bandwidth, clock)."""
    import multiprocessing

    shares = [files[i::processes] for i in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        start = time.perf_counter()
        n_bytes = sum(pool.map(_loop_bytes, shares))
        return n_bytes / 1e6 / (time.perf_counter() - start)


def tree_rss(pid: int) -> int:
    """Summed RSS (bytes) of pid and every descendant, from /proc (each process' children files: no
    scan of /proc, which would steal the CPU being measured)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    return total


def run_prepare(corpus: Path, data_dir: Path, workers: int, quiet: bool = False,
                sample_memory: bool = False) -> tuple[float, int, dict]:
    """(wall seconds, peak tree RSS or 0, manifest) of one prepare_data.py process. Sampling memory
    costs CPU, so a timed run does not sample."""
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--data", str(corpus), "--tokenizer", "gpt2",
           "--name", "bench", "--data-dir", str(data_dir), "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while sample_memory and not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare_data.py failed ({proc.returncode}):\n{out}")
    if not quiet:
        print(out.strip())
    return seconds, peak, json.loads((data_dir / "tokens" / "bench" / MANIFEST).read_text())


def shard_digests(root: Path, manifest: dict) -> dict[str, str]:
    digests = {"train": hashlib.sha256(), "val": hashlib.sha256()}
    for shard in manifest["shards"]:
        with open(root / shard["file"], "rb") as f:
            while chunk := f.read(1 << 24):
                digests[shard["split"]].update(chunk)
    return {k: v.hexdigest() for k, v in digests.items()}


def synthetic_dataset(root: Path, tokens: int, shard_tokens: int = 100_000_000) -> None:
    """A complete gpt2 dataset of `tokens` ids in sparse shards (zeros; the disk stays empty)."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, tokens, shard_tokens)):
        n = min(shard_tokens, tokens - start)
        with open(root / f"shard_{i:06d}.bin", "wb") as f:
            f.truncate(2 * n)
        shards.append({"file": f"shard_{i:06d}.bin", "split": "val" if i == 0 else "train", "tokens": n,
                       "documents": 1, "bytes": 4 * n, "sha256": "0" * 64})
    from tokenizer import Gpt2Tokenizer

    tok = Gpt2Tokenizer()
    totals = {s: {"documents": 0, "tokens": 0, "bytes": 0, "shards": 0} for s in ("train", "val")}
    for s in shards:
        for key, value in (("documents", 1), ("tokens", s["tokens"]), ("bytes", s["bytes"]), ("shards", 1)):
            totals[s["split"]][key] += value
    write_manifest(root, {"format": "gptlab-tokens", "version": 1, "name": root.name, "state": "complete",
                          "command": "synthetic", "settings": {}, "split_rule": SPLIT_RULE,
                          "tokenizer": tok.to_dict(), "tokenizer_fingerprint": tok.fingerprint(),
                          "vocab_size": tok.vocab_size, "eot_id": 50256, "dtype": "uint16", "sources": [],
                          "cursor": [0, 0], "shards": shards, "totals": totals})


def time_to_first_step(data: str, data_dir: Path, runs: Path) -> float:
    cmd = [sys.executable, str(REPO / "train.py"), "--config", "debug", "--data", data, "--tokenizer", "gpt2",
           "--data-dir", str(data_dir), "--runs-dir", str(runs), "--max-iters", "5", "--log-interval", "1",
           "--sample-length", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, GPTLAB_OFFLINE="1"))
    for line in proc.stdout:
        if line.startswith("step "):
            seconds = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return seconds
    proc.wait()
    raise SystemExit(f"train.py on {data} printed no step line (exit {proc.returncode})")


def startup(tmp: Path) -> None:
    synthetic_dataset(tmp / "data" / "tokens" / "synthetic_1b", 1_000_000_000)
    if SHAKESPEARE.is_file():
        (tmp / "data" / "shakespeare").mkdir(parents=True, exist_ok=True)
        shutil.copy(SHAKESPEARE, tmp / "data" / "shakespeare" / "input.txt")
    time_to_first_step("shakespeare", tmp / "data", tmp / "runs")  # fill the token cache: a warm start for both
    small = min(time_to_first_step("shakespeare", tmp / "data", tmp / "runs") for _ in range(3))
    big = min(time_to_first_step("synthetic_1b", tmp / "data", tmp / "runs") for _ in range(3))
    print(f"start-up to the first step (best of 3): shakespeare {small:.2f} s | 1B-token dataset {big:.2f} s | "
          f"difference {big - small:+.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="corpus size in MB of text (default 200)")
    parser.add_argument("--workers", type=int, default=0, help="prepare_data.py --workers (default 0: all cores)")
    parser.add_argument("--startup-only", action="store_true", help="only the 1B-token start-up check")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of loop, loops, prepare (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-prepare-bench-"))
    try:
        if not args.startup_only:
            corpus = tmp / "corpus"
            write_corpus(corpus, args.mb)
            from corpus.documents import find_inputs

            files = find_inputs([str(corpus)])
            size = sum(f.stat().st_size for f in files)
            print(f"corpus: {len(files)} files, {size / 1e6:,.1f} MB on disk in {corpus}")
            workers = args.workers or len(os.sched_getaffinity(0))
            # Alternating rounds: this machine's speed drifts over minutes, so each round compares runs
            # taken side by side, and the medians are printed.
            rounds = []
            for r in range(args.rounds):
                base_rate, encode_rate, expected = baseline(files)
                ceiling = parallel_ceiling(files, workers)
                shutil.rmtree(tmp / "data", ignore_errors=True)
                seconds, peak, manifest = run_prepare(corpus, tmp / "data", args.workers, quiet=r > 0)
                rate = sum(t["bytes"] for t in manifest["totals"].values()) / 1e6 / seconds
                rounds.append((base_rate, encode_rate, ceiling, rate))
                print(f"round {r + 1}: loop {base_rate:.2f} MB/s (its encode calls {encode_rate:.2f}) | {workers} loops "
                      f"at once {ceiling:.2f} | prepare_data.py {rate:.2f} ({seconds:.1f} s launch to exit) | "
                      f"{rate / base_rate:.2f}x the loop, {rate / ceiling:.0%} of the {workers} loops")
            shutil.rmtree(tmp / "data", ignore_errors=True)
            _, peak, manifest = run_prepare(corpus, tmp / "data", args.workers, quiet=True, sample_memory=True)
            base_rate, encode_rate, ceiling, rate = (statistics.median(x) for x in zip(*rounds))
            ratios = [r[3] / r[0] for r in rounds]
            print(f"throughput (medians of {args.rounds} rounds): single-process loop (read, parse, encode_ordinary) "
                  f"{base_rate:.2f} MB/s, its encode_ordinary calls alone {encode_rate:.2f} MB/s | prepare_data.py "
                  f"{rate:.2f} MB/s launch to exit | ratio {statistics.median(ratios):.2f}x the loop (rounds "
                  f"{min(ratios):.2f}-{max(ratios):.2f}), {statistics.median(r[3] / r[1] for r in rounds):.2f}x its "
                  "encode calls")
            print(f"ceiling: {workers} such loops at once, each on its share of the files: {ceiling:.2f} MB/s, "
                  f"{ceiling / base_rate:.2f}x one loop; prepare_data.py reaches "
                  f"{statistics.median(r[3] / r[2] for r in rounds):.0%} of it")
            print(f"memory: peak RSS of prepare_data.py and its processes {peak / 1e6:,.0f} MB")
            same = shard_digests(tmp / "data" / "tokens" / "bench", manifest) == expected
            print(f"correctness: shards {'equal' if same else 'DIFFER FROM'} tiktoken per document + end-of-text")
        startup(tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

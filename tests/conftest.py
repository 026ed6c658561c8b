"""Shared fixtures: a tiny config, a tiny corpus, the optional tiny shakespeare file, stage runners.

Stages are tested in this process through their main(argv) (call_main, user_error): a subprocess pays
seconds of `import torch` per launch. Subprocesses (run_cli, start_cli) are kept for what needs a
process of its own: the CLI contract (exit code 2, one `error:` line), signals, torchrun.
Tests never touch the network: GPTLAB_OFFLINE=1 is set for this process and every subprocess.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))
os.environ["GPTLAB_OFFLINE"] = "1"

from parameters import ModelConfig  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    """Half precision on this CPU is probed (a child process per dtype, cached per machine) before any
    test runs a bf16 or fp16 op in this process, and an ISA cap it needs is set now: oneDNN reads it
    once, at its first use. A CPU that crashes in half precision then cannot take the suite down."""
    from utils.cpu_probe import half_precision_cap

    if cap := half_precision_cap():
        os.environ["ONEDNN_MAX_CPU_ISA"] = cap

@pytest.fixture
def isa_cap_restored() -> Iterator[None]:
    """ONEDNN_MAX_CPU_ISA as it was before the test, whatever the code under test set. (monkeypatch.delenv
    of an unset variable records nothing to undo, so a cap set by resolve_dtype would leak.)"""
    saved = os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
    yield
    os.environ.pop("ONEDNN_MAX_CPU_ISA", None)
    if saved is not None:
        os.environ["ONEDNN_MAX_CPU_ISA"] = saved


TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40  # about 6,800 characters, 30 distinct


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> ModelConfig:
    """2 layers, n_embd 32, block 16: a model that trains in well under a second per step."""
    return ModelConfig(
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, max_iters=20,
        warmup_iters=2, eval_interval=10, eval_iters=2, log_interval=5, histogram_interval=10,
        sample_length=20, runs_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"),
        device="cpu", dtype="float32",
    ).validate()


@pytest.fixture
def tiny_text() -> str:
    return TINY_TEXT


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def documents_dir(tmp_path: Path) -> Path:
    """40 small text files, one document each (numbered, so no two are equal): --data on it prepares a
    sharded dataset."""
    root = tmp_path / "documents"
    root.mkdir()
    for i, paragraph in enumerate(TINY_TEXT.split("\n\n")[:40]):
        (root / f"{i:02d}.txt").write_text(f"{i}. {paragraph}", encoding="utf-8")
    return root


def write_pairs(path: Path, n: int = 120) -> Path:
    """n prompt/response pairs in the tiny corpus' characters: two of its words, and the first reversed 1 to
    4 times, so responses run from 2 to about 50 characters and micro-batches hold different numbers of
    targets."""
    import json

    words = sorted(set(TINY_TEXT.split()))
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            first, second = words[i % len(words)], words[i // len(words) % len(words)]  # distinct prompts
            f.write(json.dumps({"prompt": f"{first} {second}:\n", "response": " ".join([first[::-1]] * (i % 4 + 1))})
                    + "\n")
    return path


def write_benchmarks(root: Path, n: int = 12) -> dict[str, Path]:
    """n items in each benchmark format as published (HellaSwag, ARC, PIQA, the generic one, LAMBADA's
    {"text"}), with contents of our own in the tiny corpus' characters: {format: file}."""
    import json

    words = sorted(set(TINY_TEXT.replace(".", " ").replace(",", " ").replace("?", " ").replace(":", " ").split()))
    lower = [w for w in words if w == w.lower()]  # HellaSwag's ctx_b.capitalize() lowercases all but its first
    pick = lambda i, k: " ".join(words[(i * 7 + j * 3 + k) % len(words)] for j in range(2 + k % 3))  # noqa: E731
    rows: dict[str, list[dict]] = {"hellaswag": [], "arc": [], "piqa": [], "generic": [], "lambada": []}
    for i in range(n):
        rows["hellaswag"].append({"ind": i, "activity_label": f"{words[i % len(words)]} [title] speak",
                                  "ctx_a": f"Before we {pick(i, 0)},", "ctx_b": f"all {lower[i % len(lower)]} will",
                                  "ctx": f"Before we {pick(i, 0)}, all {lower[i % len(lower)]} will", "split": "val",
                                  "label": i % 4, "endings": [f"{words[(i + k) % len(words)]} [header] {words[(i * k) % len(words)]}."
                                              for k in range(4)]})
        labels = ["A", "B", "C", "D"] if i % 3 else ["1", "2", "3"]
        rows["arc"].append({"id": f"q{i}", "question": f"{pick(i, 2)}?", "answerKey": labels[i % len(labels)],
                            "choices": {"text": [pick(i, k + 3) for k in range(len(labels))], "label": labels}})
        rows["piqa"].append({"goal": pick(i, 4), "sol1": f"{pick(i, 5)}.", "sol2": f"{pick(i, 6)} all.", "label": i % 2})
        rows["generic"].append({"context": f"All:\n{pick(i, 7)}", "choices": [pick(i, k) for k in range(3)],
                                "label": i % 3})
        rows["lambada"].append({"text": f"First Citizen:\n{pick(i, 8)} {words[(i * 5) % len(words)]}"})
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, docs in rows.items():
        paths[fmt] = root / f"{fmt}_own.jsonl"
        paths[fmt].write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return paths


def benchmark_scores(run: Path, spec: str) -> tuple[dict, list[list[float]]]:
    """evaluate.py's record for a benchmark file, and every item's per-choice log-likelihoods (to hold
    against lm-eval's)."""
    from evaluation.benchmarks import read_benchmark
    from evaluation.likelihood import benchmark_metrics, encode_items, item_results, loglikelihoods
    from rundir.export import load_export

    export = load_export(run)
    bench = read_benchmark(spec)
    encoded = encode_items(bench.items, export.tokenizer, export.config.block_size)
    scores = loglikelihoods(export.model, encoded.requests, 8, export.model.lm_head.weight.device)
    lls: dict[int, list[float]] = {}
    for req, ll in zip(encoded.requests, scores.loglikelihood):
        lls.setdefault(req.item, []).append(float(ll))
    return benchmark_metrics(bench, item_results(bench, encoded, scores), encoded.skipped), [lls[i] for i in sorted(lls)]


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.fixture
def shakespeare_path() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"tiny shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "GPTLAB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_cli(script: str, *args: str, cwd: Path | None = None, timeout: float = 240,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a stage script of the repo in a subprocess; returns the completed process (text mode).
    For the CLI contract only; test what a stage does with call_main."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env or cli_env())


def call_main(main: Callable[[list[str]], int | None], *args: str) -> subprocess.CompletedProcess:
    """A stage's main(argv) in this process, with what it printed: run_cli without the start-up.
    A user error is raised, where the CLI would exit 2 with one line: check it with user_error()."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    except BaseException:
        sys.stdout.write(out.getvalue())  # into pytest's report of the failing test
        sys.stderr.write(err.getvalue())
        raise
    return subprocess.CompletedProcess(list(args), code or 0, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def user_error(*fragments: str, kind: type[Exception] = ValueError) -> Iterator[pytest.ExceptionInfo]:
    """In this process, what the CLI prints as one `error:` line with exit code 2 (utils/cli.py):
    a `kind` error (ValueError or FileNotFoundError) whose message is one line holding every fragment."""
    with pytest.raises(kind) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One debug-preset run of train.py, shared by the tests that inspect a run; its stdout is kept
    in the run directory as stdout.txt."""
    import train
    root = tmp_path_factory.mktemp("trained")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    res = call_main(train.main, "--config", "debug", "--data", str(corpus), "--runs-dir", str(root / "runs"),
                    "--data-dir", str(root / "data"), "--device", "cpu", "--run-tag", "e2e", "--seed", "7")
    assert res.returncode == 0, res.stdout + res.stderr
    (run_dir,) = (root / "runs").iterdir()
    (run_dir / "stdout.txt").write_text(res.stdout, encoding="utf-8")
    return run_dir


def start_cli(script: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a stage script with line-buffered stdout (stderr merged) for tests that signal it."""
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env or cli_env())


def resume_target(out: str, iters: int) -> int:
    """How far to resume a run that was started never to finish and then interrupted (`out`: its output,
    a "step N/" line per step): `iters`, unless the signal landed so late on a loaded machine that the
    run had taken that many steps already; then the next multiple of 10 after its last step."""
    last_step = max(int(n) for n in re.findall(r"^step +(\d+)/", out, re.MULTILINE))
    return max(iters, (last_step // 10 + 1) * 10)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """Read the process' output until a line contains `needle`; returns the lines read."""
    import time
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.monotonic() < deadline, f"timed out waiting for {needle!r}"
    raise AssertionError(f"process ended before printing {needle!r}:\n{''.join(lines)}")

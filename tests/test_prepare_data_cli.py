"""prepare_data.py, the stage: its summary, its progress line, bpe datasets, and the CLI contract
(exit 2 and one `error:` line for bad input)."""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

import prepare_data
from conftest import REPO, call_main, cli_env, run_cli, user_error
from corpus.prepare import Progress
from utils.console import ProgressLine


@pytest.fixture
def corpus(documents_dir: Path) -> Path:
    return documents_dir


def test_prepare_prints_a_summary_then_does_nothing_on_unchanged_inputs(corpus: Path, tmp_path: Path) -> None:
    args = ["--data", str(corpus), "--tokenizer", "gpt2", "--data-dir", str(tmp_path / "data"), "--workers", "2"]
    first = call_main(prepare_data.main, *args)
    assert first.returncode == 0
    root = tmp_path / "data" / "tokens" / "documents-gpt2"  # the default name: the first input's and the tokenizer's
    assert f"dataset {root}: prepared | 40 source files | tokenizer gpt2 (vocab 50,257, end-of-text id 50256" in first.stdout
    manifest = json.loads((root / "manifest.json").read_text())
    for split in ("train", "val"):
        t = manifest["totals"][split]
        assert f"{split:<6} {t['documents']:>12,} {t['tokens']:>15,}" in first.stdout
    assert "train on it: python train.py --data documents-gpt2 --data-dir" in first.stdout
    assert manifest["command"].startswith("python prepare_data.py --data")
    again = call_main(prepare_data.main, *args)
    assert "up to date" in again.stdout and "nothing to do: the inputs are unchanged" in again.stdout


def test_a_bpe_dataset_ships_its_hugging_face_tokenizer(corpus: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    from corpus import shards

    res = call_main(prepare_data.main, "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", "300",
                    "--name", "b", "--data-dir", str(tmp_path / "data"), "--workers", "1")
    assert res.returncode == 0
    ds = shards.open_dataset(tmp_path / "data" / "tokens" / "b")
    hf = HFTokenizer.from_file(str(ds.root / "tokenizer.json"))
    text = (corpus / "03.txt").read_text()
    assert hf.encode(text).ids == ds.tokenizer.encode(text) and ds.tokenizer.vocab_size == 300
    assert json.loads(hf.to_str()) == ds.manifest["tokenizer"]["tokenizer"]


def test_bad_arguments_are_one_line(corpus: Path, tmp_path: Path) -> None:
    with user_error("vocab_size: must be in [257, 2**32]"):
        call_main(prepare_data.main, "--data", str(corpus), "--tokenizer", "bpe", "--vocab-size", str(2**32 + 1))
    with user_error("tokenizer: 'gtp2' is not registered (did you mean 'gpt2'?)"):
        call_main(prepare_data.main, "--data", str(corpus), "--tokenizer", "gtp2")
    with user_error("--name 'a/b' must be a plain directory name"):
        call_main(prepare_data.main, "--data", str(corpus), "--name", "a/b")


def test_cli_contract(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    res = run_cli("prepare_data.py", "--data", str(tmp_path / "c.jsonl"), "--data-dir", str(tmp_path / "d"),
                  cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: '{tmp_path / 'c.jsonl'}' line 2: no 'text' field (it has: txt); pass --text-field with the field "
        "that holds the text")
    assert not (tmp_path / "d" / "tokens" / "c-char").exists()


def test_progress_line_rewrites_one_line_on_a_terminal_and_prints_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Terminal(), io.StringIO()
    p = Progress(50_000_000, 100_000_000, 40_000_000, 1234, 9_000_000, 4.0)
    for stream in (tty, log):
        line = ProgressLine("preparing x", stream)
        line.last_print = -1e9  # as if the last line were long ago
        line(p)
        line.close()
    assert tty.getvalue().startswith("\rpreparing x:  50.0% | 40.0 MB of text at 10.00 MB/s | 1,234 documents | "
                                     "9,000,000 tokens | ETA 4s") and tty.getvalue().endswith("\n")
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()


# --- stopping: Ctrl-C, SIGTERM and a full disk end the stage at once, in one line, with no process left ---

@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """12 jsonl files, 48 MB of word salad: gpt2 on 2 workers takes a few seconds, so a signal lands mid-way."""
    root = tmp_path_factory.mktemp("big") / "corpus"
    root.mkdir()
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(5000)]
    for i in range(12):
        with open(root / f"{i:02d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(800):
                f.write(json.dumps({"text": " ".join(rng.choices(words, k=800))}) + "\n")
    return root


def start_prepare(corpus: Path, data_dir: Path, limit_file_bytes: int = 0) -> subprocess.Popen:
    """prepare_data.py in a process group of its own (as a terminal runs it), its workers in it too."""
    def limits() -> None:
        if limit_file_bytes:  # `ulimit -f`: a write past it fails with EFBIG, as a full disk fails one
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.Popen([sys.executable, str(REPO / "prepare_data.py"), "--data", str(corpus), "--tokenizer",
                             "gpt2", "--workers", "2", "--shard-tokens", "200000", "--data-dir", str(data_dir)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=limits)


def ended_cleanly(proc: subprocess.Popen, expected_rc: int, last_line: str) -> None:
    """The stage exits within 60 s (a hang fails here), says one line, and leaves no process behind."""
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("prepare_data.py did not exit within 60 s of being stopped") from None
    if proc.returncode == 0:  # it finished before the signal landed: nothing to check but that
        return
    lines = err.strip().splitlines()
    assert proc.returncode == expected_rc and lines[-1].startswith(last_line), err
    assert "Traceback" not in err and "leaked" not in err, err
    for _ in range(50):  # the workers, the forkserver and the resource tracker go with it
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError("processes of the stopped prepare_data.py are still running")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_prepare_at_once_every_time(big_corpus: Path, tmp_path: Path) -> None:
    """Ctrl-C reached the main process and its workers together; the pool then hung in 3 of 6 tries."""
    rng = random.Random(1)
    for attempt in range(10):
        proc = start_prepare(big_corpus, tmp_path / f"data{attempt}")
        time.sleep(rng.uniform(0.5, 2.2))  # start-up, fingerprinting, or tokenizing
        os.killpg(proc.pid, signal.SIGINT)
        ended_cleanly(proc, 130, "interrupted: SIGINT while preparing; run the same command again")


@pytest.mark.slow
def test_sigterm_to_the_main_process_alone_stops_its_workers_too(big_corpus: Path, tmp_path: Path) -> None:
    for attempt in range(2):
        proc = start_prepare(big_corpus, tmp_path / f"data{attempt}")
        time.sleep(1.5 + attempt * 0.5)
        proc.send_signal(signal.SIGTERM)
        ended_cleanly(proc, 143, "interrupted: SIGTERM while preparing; run the same command again")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_never_hangs(big_corpus: Path, tmp_path: Path) -> None:
    for attempt in range(4):
        proc = start_prepare(big_corpus, tmp_path / f"data{attempt}", limit_file_bytes=3_000_000 + attempt * 100_000)
        ended_cleanly(proc, 2, "error: cannot write the dataset")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_one_line(big_corpus: Path, tmp_path: Path) -> None:
    """The OOM killer takes a worker: the stage says so and stops (its result would never come)."""
    proc = start_prepare(big_corpus, tmp_path / "data")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the workers are the forkserver's children
        workers = [w for c in children(proc.pid) for w in children(c)]
        if workers:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    ended_cleanly(proc, 2, "error: a tokenizing worker process died (exit code -9: killed, or out of memory)")

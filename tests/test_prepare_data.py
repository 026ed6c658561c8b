"""prepare_data.py, the stage: its summary, its progress line, bpe datasets, and the CLI contract
(exit 2 and one `error:` line for bad input)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import prepare_data
from conftest import call_main, run_cli, user_error
from dataset import Progress
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

    import shards

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

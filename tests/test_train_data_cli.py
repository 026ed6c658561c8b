"""train.py on prepared datasets: a directory or jsonl given to --data is prepared once into shards
and reused, a prepared dataset trains by name, bits per byte are reported at every eval, and a run on
shards resumes bit-identically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY_TEXT, call_main, user_error
from rundir.export import load_export

ARGS = ["--config", "debug", "--device", "cpu", "--max-iters", "12", "--eval-interval", "6", "--eval-iters", "2",
        "--sample-length", "0", "--val-fraction", "0.3"]


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    paragraphs = TINY_TEXT.split("\n\n")
    for i in range(0, len(paragraphs) - 1, 4):
        (root / f"{i:03d}.txt").write_text(f"Scene {i}.\n" + "\n\n".join(paragraphs[i:i + 4]), encoding="utf-8")
    return root


def only_run(runs: Path) -> Path:
    (run,) = runs.iterdir()
    return run


def test_a_directory_is_prepared_once_then_reused_and_reports_bpb(corpus_dir: Path, tmp_path: Path) -> None:
    common = [*ARGS, "--data", str(corpus_dir), "--data-dir", str(tmp_path / "data")]
    first = call_main(train.main, *common, "--runs-dir", str(tmp_path / "r1"))
    assert first.returncode == 0, first.stderr
    (ds,) = (tmp_path / "data" / "tokens").iterdir()
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["state"] == "complete" and len(manifest["sources"]) == len(list(corpus_dir.iterdir()))
    assert f"data {ds}: prepared dataset" in first.stdout and "val bpb" in first.stdout
    run = only_run(tmp_path / "r1")
    status = json.loads((run / "meta" / "status.json").read_text())
    bpb = status["val_bpb"]
    splits = manifest["totals"]["val"]
    assert bpb == pytest.approx(status["val_loss"] / math.log(2) * splits["tokens"] / splits["bytes"])
    assert "val bpb" in (run / "logs" / "train.log").read_text()
    shard_times = [p.stat().st_mtime_ns for p in ds.glob("shard_*.bin")]
    second = call_main(train.main, *common, "--runs-dir", str(tmp_path / "r2"))
    assert second.returncode == 0 and [p.stat().st_mtime_ns for p in ds.glob("shard_*.bin")] == shard_times
    by_name = call_main(train.main, *ARGS, "--data", ds.name, "--data-dir", str(tmp_path / "data"),
                        "--runs-dir", str(tmp_path / "r3"))
    assert by_name.returncode == 0
    assert f"the dataset {ds} was prepared with val_fraction 0.3 (not 0.1)" not in by_name.stdout  # same settings
    other = call_main(train.main, *ARGS, "--data", ds.name, "--data-dir", str(tmp_path / "data"), "--runs-dir",
                      str(tmp_path / "r4"), "--val-fraction", "0.2", "--tokenizer", "gpt2")
    assert (f"the dataset {ds} was prepared with tokenizer 'char' (not 'gpt2'), val_fraction 0.3 (not 0.2): the run "
            "uses those") in other.stdout
    recorded = json.loads((only_run(tmp_path / "r4") / "meta" / "full_config.json").read_text())
    assert recorded["tokenizer"] == "char" and recorded["val_fraction"] == 0.3
    model = load_export(only_run(tmp_path / "r3")).tokenizer
    assert model.eot_id == model.vocab_size - 1  # char: the reserved end-of-text id is the last


def test_a_run_on_shards_resumes_bit_identical(corpus_dir: Path, tmp_path: Path) -> None:
    common = [*ARGS, "--data", str(corpus_dir), "--data-dir", str(tmp_path / "data"), "--dropout", "0.1",
              "--lr-decay-iters", "12"]  # the schedule of the 12-step run, in the 6-step one too
    straight = call_main(train.main, *common, "--runs-dir", str(tmp_path / "a"))
    assert straight.returncode == 0
    half = call_main(train.main, *common, "--runs-dir", str(tmp_path / "b"), "--max-iters", "6")
    assert half.returncode == 0
    resumed = call_main(train.main, "--resume", str(only_run(tmp_path / "b")), "--max-iters", "12")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (load_export(only_run(tmp_path / d)).model.state_dict() for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_jsonl_trains_directly_and_a_bad_line_is_one_error(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"{i}. {p}"}) for i, p in enumerate(TINY_TEXT.split("\n\n")) if p]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    res = call_main(train.main, *ARGS, "--data", str(tmp_path / "c.jsonl"), "--data-dir", str(tmp_path / "data"),
                    "--runs-dir", str(tmp_path / "runs"), "--tokenizer", "gpt2")
    assert res.returncode == 0 and "prepared dataset" in res.stdout
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:5] + ["{oops"]) + "\n")
    with user_error("d.jsonl' line 6: not JSON"):
        call_main(train.main, *ARGS, "--data", str(tmp_path / "d.jsonl"), "--data-dir", str(tmp_path / "data"),
                  "--runs-dir", str(tmp_path / "runs2"))
    assert not (tmp_path / "runs2").exists()


def test_bpe_trains_on_one_text_and_on_documents_and_its_export_carries_the_tokenizer(
        corpus_dir: Path, tiny_corpus: Path, tmp_path: Path) -> None:
    import inference

    for name, data in (("text", tiny_corpus), ("documents", corpus_dir)):
        res = call_main(train.main, *ARGS, "--data", str(data), "--data-dir", str(tmp_path / "data"),
                        "--runs-dir", str(tmp_path / name), "--tokenizer", "bpe", "--vocab-size", "300")
        assert res.returncode == 0, res.stderr
        run = only_run(tmp_path / name)
        export = load_export(run)
        assert export.tokenizer.name == "bpe" and export.tokenizer.vocab_size <= 300
        assert json.loads((run / "artifacts" / "export" / "hf" / "tokenizer.json").read_text()) == \
            export.tokenizer.to_dict()["tokenizer"]
        out = call_main(inference.main, "--run", str(run), "--prompt", "First", "--max-new-tokens", "5",
                        "--temperature", "0")
        assert out.returncode == 0 and out.stdout.startswith("First")

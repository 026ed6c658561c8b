"""Tests for documents.py (corpus files -> documents) and dataset.py (prepared, sharded token datasets):
exact tokens against tiktoken per document, worker-count invariance, resume after a stop, appends,
the split rule, and the one-line errors of bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from corpus import documents
from corpus import prepare as prepare_module
from conftest import REPO, SHAKESPEARE
from corpus.prepare import DatasetSettings, prepare
from corpus.shards import TokenDataset, open_dataset
from tokenizer import gpt2_encoding

EOT = 50256
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box nightly café naïve 東京 🙂".split()


def make_text(rng: random.Random, n_words: int) -> str:
    lines = []
    for _ in range(max(1, n_words // 12)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)))
    return "\n".join(lines) + rng.choice(["", "\n", "\n\n", "  \n"])


def make_corpus(root: Path, seed: int = 0, n_jsonl: int = 120, n_text: int = 4) -> list[str]:
    """txt, md, jsonl, jsonl.gz, jsonl.zst and parquet files; returns the documents in reading order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    texts = {f"a{i}.txt": make_text(rng, 300) for i in range(n_text)}
    texts["b.md"] = "# title\n\n" + make_text(rng, 100)
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    jsonl = [make_text(rng, 40) for _ in range(n_jsonl)]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(jsonl)).encode()
    (root / "sub" / "c.jsonl").write_bytes(lines)
    (root / "sub" / "d.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "sub" / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    rows = [make_text(rng, 40) for _ in range(n_jsonl)]
    pq.write_table(pa.table({"text": rows, "n": list(range(n_jsonl))}), root / "sub" / "f.parquet", row_group_size=37)
    return [*texts.values(), *jsonl, *jsonl, *jsonl, *rows]


def expected_splits(corpus: Path, docs: list[str], val_fraction: float) -> dict[str, list[int]]:
    """The split rule, re-implemented from its documentation: a text file by its SHA-256, a record by
    BLAKE2b-64 of its text; ids = tiktoken's encode_ordinary of each document + end-of-text."""
    files = documents.find_inputs([str(corpus)])
    hashes = [hashlib.sha256(f.read_bytes()).digest() for f in files if f.suffix in (".txt", ".md")]
    hashes += [hashlib.blake2b(d.encode(), digest_size=8).digest() for d in docs[len(hashes):]]
    out: dict[str, list[int]] = {"train": [], "val": []}
    for doc, digest in zip(docs, hashes):
        split = "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"
        out[split] += gpt2_encoding().encode_ordinary(doc) + [EOT]
    return out


def shard_ids(ds: TokenDataset) -> dict[str, list[int]]:
    return {split: np.concatenate(arrays).tolist() for split, arrays in ds.splits.items()}


def shard_digests(root: Path) -> list[tuple[str, str, str]]:
    manifest = json.loads((root / "manifest.json").read_text())
    return [(s["file"], s["split"], hashlib.sha256((root / s["file"]).read_bytes()).hexdigest())
            for s in manifest["shards"]]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "corpus"
    return root, make_corpus(root)


def test_find_inputs_recursive_sorted_and_globs(corpus: tuple[Path, list[str]]) -> None:
    root, _ = corpus
    names = [p.name for p in documents.find_inputs([str(root)])]
    assert names == ["a0.txt", "a1.txt", "a2.txt", "a3.txt", "b.md", "c.jsonl", "d.jsonl.gz", "e.jsonl.zst",
                     "f.parquet"]
    assert [p.name for p in documents.find_inputs([str(root / "sub" / "*.jsonl*"), str(root / "b.md")])] == \
        ["c.jsonl", "d.jsonl.gz", "e.jsonl.zst", "b.md"]
    (root / "notes.csv").write_text("x")
    with pytest.raises(ValueError, match="notes.csv' is not a supported corpus file"):
        documents.find_inputs([str(root / "notes.csv")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        documents.find_inputs([str(root / "missing")])
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt"):
        documents.find_inputs([str(root / "empty")])


def test_text_pieces_encode_exactly_as_the_whole(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A big text file comes in pieces; encoding them one by one equals encoding the whole file."""
    text = SHAKESPEARE.read_text() if SHAKESPEARE.is_file() else make_text(random.Random(1), 40_000)
    path = tmp_path / "big.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # a byte-order mark is not text
    monkeypatch.setattr(documents, "PIECE_CHARS", 2000)
    pieces = list(documents.read_pieces(path))
    assert len(pieces) > 20 and [p[2] for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p[0] for p in pieces) == text
    enc = gpt2_encoding()
    assert [i for p in pieces for i in enc.encode_ordinary(p[0])] == enc.encode_ordinary(text)


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_equal_tiktoken_per_document(corpus: tuple[Path, list[str]], tmp_path: Path, workers: int) -> None:
    root, docs = corpus
    result = prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2", val_fraction=0.2), workers=workers,
                     shard_tokens=4000)
    ds = open_dataset(tmp_path / "ds")
    expected = expected_splits(root, docs, 0.2)
    assert shard_ids(ds) == expected
    assert len(result.manifest["shards"]) > 4 and ds.manifest["dtype"] == "uint16"
    totals = ds.manifest["totals"]
    assert totals["train"]["documents"] + totals["val"]["documents"] == len(docs)
    assert totals["val"]["documents"] > 0 and totals["train"]["tokens"] == len(expected["train"])
    assert sum(t["bytes"] for t in totals.values()) == sum(len(d.encode()) for d in docs)
    assert ds.split_bytes == {s: totals[s]["bytes"] for s in ("train", "val")}


def test_worker_count_does_not_change_a_byte(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = corpus
    for name, workers in (("one", 1), ("three", 3)):
        prepare([str(root)], tmp_path / name, DatasetSettings("gpt2"), workers=workers, shard_tokens=3000)
    assert shard_digests(tmp_path / "one") == shard_digests(tmp_path / "three")


def test_stopped_run_continues_to_the_same_shards(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = corpus
    prepare([str(root)], tmp_path / "straight", DatasetSettings("gpt2"), workers=1, shard_tokens=3000)

    calls = []

    def stop_midway(progress: prepare_module.Progress) -> None:
        calls.append(progress)
        if len(calls) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare([str(root)], tmp_path / "stopped", DatasetSettings("gpt2"), workers=2, shard_tokens=3000,
                progress=stop_midway)
    partial = json.loads((tmp_path / "stopped" / "manifest.json").read_text())
    assert partial["state"] == "partial" and partial["shards"] and partial["cursor"] != [0, 0]
    assert not list((tmp_path / "stopped").glob(".*.tmp"))
    result = prepare([str(root)], tmp_path / "stopped", DatasetSettings("gpt2"), workers=2, shard_tokens=3000)
    assert result.action == "continued"
    assert shard_digests(tmp_path / "stopped") == shard_digests(tmp_path / "straight")


def test_unchanged_inputs_do_nothing_and_new_files_are_appended(corpus: tuple[Path, list[str]],
                                                                tmp_path: Path) -> None:
    root, docs = corpus
    settings = DatasetSettings("gpt2", val_fraction=0.3)
    prepare([str(root)], tmp_path / "ds", settings, workers=1, shard_tokens=5000)
    before = shard_digests(tmp_path / "ds")
    again = prepare([str(root)], tmp_path / "ds", settings, workers=1)
    assert again.action == "up to date" and again.progress.tokens == 0
    extra = [make_text(random.Random(7), 60) for _ in range(30)]
    (root / "sub" / "g.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    appended = prepare([str(root)], tmp_path / "ds", settings, workers=2, shard_tokens=5000)
    assert appended.action == "appended" and appended.progress.documents == len(extra)
    assert shard_digests(tmp_path / "ds")[:len(before)] == before  # old shards untouched: no document moved
    ds = open_dataset(tmp_path / "ds")
    old = expected_splits(root, docs, 0.3)
    new = {"train": [], "val": []}
    for t in extra:
        h = hashlib.blake2b(t.encode(), digest_size=8).digest()
        new["val" if int.from_bytes(h, "big") < 0.3 * 2**64 else "train"] += gpt2_encoding().encode_ordinary(t) + [EOT]
    assert shard_ids(ds) == {s: old[s] + new[s] for s in old}


def test_changed_missing_inputs_and_other_settings_are_refused(corpus: tuple[Path, list[str]],
                                                               tmp_path: Path) -> None:
    root, _ = corpus
    prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    with pytest.raises(ValueError, match=r"prepared with other settings \(val_fraction 0.1 -> 0.2\)"):
        prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2", val_fraction=0.2), workers=1)
    with pytest.raises(ValueError, match="which is not among the inputs now"):
        prepare([str(root / "sub")], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    (root / "a1.txt").write_text("edited", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a1.txt' changed since .* was prepared from it"):
        prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)


def test_one_document_keeps_the_tail_split(tmp_path: Path, tiny_text: str) -> None:
    (tmp_path / "one.txt").write_text(tiny_text, encoding="utf-8")
    prepare([str(tmp_path / "one.txt")], tmp_path / "ds", DatasetSettings("gpt2", val_fraction=0.1), workers=1)
    ds = open_dataset(tmp_path / "ds")
    ids = gpt2_encoding().encode_ordinary(tiny_text) + [EOT]
    n_train = int(len(ids) * 0.9)
    assert shard_ids(ds) == {"train": ids[:n_train], "val": ids[n_train:]}
    assert ds.split_bytes["val"] == len(gpt2_encoding().decode(ids[n_train:-1]).encode())  # the eot is no text
    assert ds.split_bytes["train"] + ds.split_bytes["val"] == len(tiny_text.encode())


def test_char_dataset_has_an_end_of_text_id_and_a_fixed_vocabulary(tmp_path: Path) -> None:
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("abc\nabd\n" * 50)
    (corpus / "b.txt").write_text("cab\n" * 50)
    prepare([str(corpus)], tmp_path / "ds", DatasetSettings("char", val_fraction=0.5), workers=2)
    ds = open_dataset(tmp_path / "ds")
    assert ds.tokenizer.to_dict()["chars"] == ["\n", "a", "b", "c", "d"] and ds.tokenizer.eot_id == 5
    every = sorted(np.concatenate([*ds.splits["train"], *ds.splits["val"]]).tolist())
    assert every.count(5) == 2
    (corpus / "z.txt").write_text("zebra")
    with pytest.raises(ValueError, match="characters outside this char dataset's vocabulary"):
        prepare([str(corpus)], tmp_path / "ds", DatasetSettings("char", val_fraction=0.5), workers=1)


def write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("lines, message", [
    ([b'{"text": "ok"}', b'{"text": broken}'], r"c.jsonl' line 2: not JSON"),
    ([b'{"text": "ok"}', b'{"body": "no text"}'], r"c.jsonl' line 2: no 'text' field \(it has: body\)"),
    ([b'{"text": "ok"}', b'{"text": 3}'], r"c.jsonl' line 2: field 'text' is a int, not text"),
    ([b'{"text": "ok"}', b'{"text": "\xff"}'], r"c.jsonl' line 2: not valid UTF-8"),
])
def test_bad_jsonl_names_the_line_and_leaves_nothing(tmp_path: Path, lines: list[bytes], message: str) -> None:
    write_jsonl(tmp_path / "c.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        prepare([str(tmp_path / "c.jsonl")], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    assert not (tmp_path / "ds").exists()


def test_other_bad_input_is_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet' has no column 'text' \(it has: body\)"):
        prepare([str(tmp_path / "p.parquet")], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt' is not valid UTF-8 at byte 3"):
        prepare([str(tmp_path / "latin.txt")], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    write_jsonl(tmp_path / "empty.jsonl", [b'{"text": ""}', b""])
    for tok in ("gpt2", "char"):
        with pytest.raises(ValueError, match="holds no"):
            prepare([str(tmp_path / "empty.jsonl")], tmp_path / "ds", DatasetSettings(tok), workers=1)
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:-20])
    with pytest.raises(ValueError, match="z.jsonl.gz' is a damaged or truncated archive"):
        prepare([str(tmp_path / "z.jsonl.gz")], tmp_path / "ds", DatasetSettings("gpt2"), workers=1)
    with pytest.raises(ValueError, match="cannot read '.*gone.txt'"):
        prepare_module.fingerprint_sources([tmp_path / "gone.txt"], {})
    assert not (tmp_path / "ds").exists()


def test_damaged_or_partial_datasets_are_refused(corpus: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, _ = corpus
    prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2"), workers=1, shard_tokens=5000)
    shard = tmp_path / "ds" / "shard_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shard_000001.bin' is .* bytes, but the manifest records"):
        open_dataset(tmp_path / "ds")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["state"] = "partial"
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="only partly prepared"):
        open_dataset(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="is not a prepared dataset"):
        open_dataset(tmp_path)


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # past the limit a write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from utils.cli import run_main
import prepare_data
run_main(lambda: prepare_data.main(sys.argv[1:]))
"""


def test_a_full_disk_is_one_line_and_the_same_command_continues(corpus: tuple[Path, list[str]],
                                                                tmp_path: Path) -> None:
    """RLIMIT_FSIZE (a cap on any one file) stands in for a full disk: the shard of a big last document
    fails to write, after the smaller shards before it were committed."""
    root, _ = corpus
    (root / "z_big.txt").write_text(make_text(random.Random(3), 10_000), encoding="utf-8")
    args = ["--data", str(root), "--tokenizer", "gpt2", "--name", "ds", "--data-dir", str(tmp_path / "d"),
            "--shard-tokens", "3000", "--workers", "1"]
    res = subprocess.run([sys.executable, "-c", FULL_DISK.format(repo=str(REPO), limit=12_000), *args],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write the dataset") and "run the same command again" in last
    ds = tmp_path / "d" / "tokens" / "ds"
    assert json.loads((ds / "manifest.json").read_text())["state"] == "partial"
    assert not list(ds.glob(".*.tmp"))
    done = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    prepare([str(root)], tmp_path / "straight", DatasetSettings("gpt2"), workers=1, shard_tokens=3000)
    assert shard_digests(ds) == shard_digests(tmp_path / "straight")


def test_sigkill_then_the_same_command_loses_and_duplicates_nothing(corpus: tuple[Path, list[str]],
                                                                    tmp_path: Path) -> None:
    root, _ = corpus
    args = [sys.executable, str(REPO / "prepare_data.py"), "--data", str(root), "--tokenizer", "gpt2", "--name",
            "ds", "--data-dir", str(tmp_path / "d"), "--shard-tokens", "1500", "--workers", "2"]
    ds = tmp_path / "d" / "tokens" / "ds"
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(ds.glob("shard_*.bin"))) < 3:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert subprocess.run(args, cwd=tmp_path, capture_output=True, timeout=120).returncode == 0
    prepare([str(root)], tmp_path / "straight", DatasetSettings("gpt2"), workers=1, shard_tokens=1500)
    assert shard_digests(ds) == shard_digests(tmp_path / "straight")


def test_vocabulary_over_uint32_is_refused() -> None:
    from parameters import ModelConfig

    with pytest.raises(ValueError, match=r"vocab_size: must be in \[257, 2\*\*32\]"):
        ModelConfig(vocab_size=2**32 + 1).validate()



def test_a_lone_surrogate_names_its_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "s.jsonl", [b'{"text": "fine"}', b'{"text": "bad \\ud800 here"}'])
    with pytest.raises(ValueError, match=r"s.jsonl' line 2: holds '\\ud800', which is not a character"):
        prepare([str(tmp_path / "s.jsonl")], tmp_path / "ds", DatasetSettings("gpt2"), workers=2)


def test_a_source_changed_while_it_is_read_is_never_committed(corpus: tuple[Path, list[str]], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest records each source's size and SHA-256 from before it was read: a file truncated while
    prepare reads it must not leave its shorter text committed under the full file's record."""
    root, _ = corpus
    victim = root / "a3.txt"  # read after the earlier text files, so the first task truncates it in time
    whole = victim.read_bytes()
    encode = prepare_module.encode_task

    def truncate_then_encode(task):
        if victim.stat().st_size == len(whole):
            victim.write_bytes(whole[: len(whole) // 2])
        return encode(task)

    monkeypatch.setattr(prepare_module, "encode_task", truncate_then_encode)
    with pytest.raises(ValueError, match=f"'{victim}' changed while it was being read .*nothing read from it was kept"):
        prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2"), workers=1, shard_tokens=500)
    monkeypatch.setattr(prepare_module, "encode_task", encode)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["state"] == "partial"
    victim.write_bytes(whole)  # restored: the same command continues, to exactly the whole corpus
    assert prepare([str(root)], tmp_path / "ds", DatasetSettings("gpt2"), workers=1, shard_tokens=500).action == "continued"
    prepare([str(root)], tmp_path / "straight", DatasetSettings("gpt2"), workers=1, shard_tokens=500)
    assert shard_digests(tmp_path / "ds") == shard_digests(tmp_path / "straight")


def test_null_and_empty_texts_are_counted_as_skipped(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "two", "", None]}), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "j.jsonl", [b'{"text": "three"}', b'{"text": null}', b'{"text": ""}'])
    for workers in (1, 2):
        result = prepare([str(tmp_path / "p.parquet"), str(tmp_path / "j.jsonl")], tmp_path / f"ds{workers}",
                         DatasetSettings("gpt2"), workers=workers)
        assert result.progress.empty == 5 and result.progress.documents == 3


def test_a_bpe_vocabulary_the_corpus_cannot_hold_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a small corpus " * 10, encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab_size 1,000,000,000 is more than a byte-level BPE can learn from "
                                         r"150 bytes of text \(at most 407"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "ds", DatasetSettings("bpe", vocab_size=10**9), workers=1)
    assert not (tmp_path / "ds").exists()

"""data.py: what --data names (resolve_data), and a resume that must read the data it trained on."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from corpus.text import load_text
from data import check_same_corpus, prepare_corpus, resolve_data
from parameters import ModelConfig


def test_a_resume_on_other_text_is_refused(tiny_text: str, tmp_path: Path) -> None:
    cfg = ModelConfig(data=str(tmp_path / "a.txt"), data_dir=str(tmp_path / "data"), block_size=16).validate()
    Path(cfg.data).write_text(tiny_text)
    corpus = prepare_corpus(cfg)
    check_same_corpus(corpus.identity, corpus)
    check_same_corpus(None, corpus)  # a checkpoint from before corpora were recorded
    Path(cfg.data).write_text(tiny_text.replace("Speak", "Spoke"))
    with pytest.raises(ValueError, match=r"the data changed since this run was trained: .*a.txt now has SHA-256"):
        check_same_corpus(corpus.identity, prepare_corpus(cfg))


def test_resolve_data_routes_each_kind(tmp_path: Path, tiny_corpus: Path) -> None:
    ds = tmp_path / "data" / "tokens" / "web"
    ds.mkdir(parents=True)
    (ds / "manifest.json").write_text("{}")
    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    route = lambda spec: resolve_data(spec, tmp_path / "data")  # noqa: E731
    assert route("shakespeare") == ("text", None) and route(str(tiny_corpus)) == ("text", None)
    assert route("web") == ("dataset", ds) and route(str(ds)) == ("dataset", ds)
    assert route(str(tmp_path)) == ("directory", None)
    assert route(str(tmp_path / "c.jsonl")) == ("files", None) and route(str(tmp_path / "*.jsonl")) == ("files", None)
    with pytest.raises(FileNotFoundError, match="data path '.*nope' does not exist"):
        route(str(tmp_path / "nope"))


def test_a_directory_run_from_before_datasets_resumes_on_its_one_text(tmp_path: Path) -> None:
    """A checkpoint without a data 'kind' read a directory as one text: resuming it does so again."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(f"{i} file " * 50, encoding="utf-8")
    cfg = ModelConfig(data=str(corpus), data_dir=str(tmp_path / "data"), block_size=8, val_fraction=0.3)
    old = prepare_corpus(cfg, recorded={"source": str(corpus), "sha256": "x"})
    assert old.kind == "text" and old.sha256 == hashlib.sha256(load_text(str(corpus), "").text.encode()).hexdigest()
    new = prepare_corpus(cfg)
    assert new.kind == "dataset" and new.tokenizer.eot_id is not None

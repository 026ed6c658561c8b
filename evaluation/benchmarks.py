"""Benchmark files: multiple-choice and last-word items, read from the formats as they are published.

    bench = read_benchmark("hellaswag_val.jsonl")          # the format is told by the fields of its lines
    bench = read_benchmark("lambada:lambada_test.jsonl")   # or named before a colon (a LAMBADA line is
                                                           # {"text"}, as a corpus' is, so it is always named)
    bench.items[0]     # Item(context="Question: ...\\nAnswer:", choices=("...", "..."), label=1, delimiter=" ")

Each item becomes, per choice, the request lm-evaluation-harness makes: context, and continuation =
delimiter + choice (lm-eval's target_delimiter, a space). The contexts are lm-eval's own templates:
    generic     {"context", "choices", "label"[, "delimiter"]}        context as it is
    hellaswag   {"ctx_a", "ctx_b", "activity_label", "endings", "label"} (or {"ctx", "endings", "label"})
                "<activity_label>: <ctx_a> <Ctx_b>" with lm-eval's clean-up of WikiHow's [title] brackets
    arc         {"question", "choices": {"text", "label"}, "answerKey"} (Hugging Face's), or the original
                {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}: "Question: <q>\\nAnswer:"
    piqa        {"goal", "sol1", "sol2", "label"}: "Question: <goal>\\nAnswer:"; the original valid.jsonl
                keeps its labels in valid-labels.lst beside it, which is read when the lines have none
    lambada     {"text"}: the context is the text up to its last space, the one choice its last word
A format is one function (a line's object -> Item) and one registry entry; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from parameters import BENCHMARK_FORMATS


class Item(NamedTuple):
    context: str
    choices: tuple[str, ...]   # what follows the context after the delimiter
    label: int                 # the index of the right choice
    delimiter: str = " "       # between the context and each choice (lm-eval's target_delimiter)


@dataclass(frozen=True)
class BenchmarkFormat:
    name: str
    fields: tuple[str, ...]      # keys every line has: how a file's format is told (auto) and checked
    kind: str                    # "choice" (multiple choice) or "lastword" (greedy last word and its loss)
    read: Callable[[dict], Item]
    auto: bool = True            # told by its fields; False: only when named ("lambada:FILE")


@dataclass(frozen=True)
class Benchmark:
    name: str                    # the file's stem: hellaswag_val
    path: Path
    format: BenchmarkFormat
    items: list[Item]
    sha256: str                  # of the file's bytes: two scores are of the same items only if equal


def benchmark_format(name: str, fields: tuple[str, ...], kind: str = "choice", auto: bool = True):
    """Decorator: register a function (a line's object -> Item) as the reader of a format."""
    def add(read: Callable[[dict], Item]) -> Callable[[dict], Item]:
        BENCHMARK_FORMATS.register(name)(BenchmarkFormat(name, fields, kind, read, auto))
        return read
    return add


@benchmark_format("hellaswag", ("ctx", "endings"))
def hellaswag(doc: dict) -> Item:
    """lm-eval's hellaswag task: its process_docs and preprocess, line for line."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if "ctx_a" in doc else doc["ctx"]
    query = doc["activity_label"] + ": " + ctx if "activity_label" in doc else ctx
    return Item(_hellaswag_clean(query), tuple(_hellaswag_clean(e) for e in doc["endings"]), int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are artifacts of HellaSwag's WikiHow part
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


@benchmark_format("arc", ("question", "answerKey"))
def arc(doc: dict) -> Item:
    question, choices = doc["question"], doc.get("choices")
    if isinstance(question, dict):  # the original release nests the choices in the question
        question, choices = question["stem"], {"text": [c["text"] for c in question["choices"]],
                                               "label": [c["label"] for c in question["choices"]]}
    if doc["answerKey"] not in choices["label"]:
        raise ValueError(f"answerKey {doc['answerKey']!r} is not one of the choices' labels {choices['label']}")
    return Item(f"Question: {question}\nAnswer:", tuple(choices["text"]), choices["label"].index(doc["answerKey"]))


@benchmark_format("piqa", ("goal", "sol1", "sol2"))
def piqa(doc: dict) -> Item:
    return Item(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"]))


@benchmark_format("generic", ("context", "choices", "label"))
def generic(doc: dict) -> Item:
    return Item(doc["context"], tuple(doc["choices"]), int(doc["label"]), doc.get("delimiter", " "))


@benchmark_format("lambada", ("text",), kind="lastword", auto=False)
def lambada(doc: dict) -> Item:
    """lm-eval's lambada_openai: context "text.split(' ')[:-1] joined", target " " + the last word."""
    words = doc["text"].split(" ")
    if len(words) < 2:
        raise ValueError("the text has no space, so no last word to predict from a context")
    return Item(" ".join(words[:-1]), (words[-1],), 0)


def split_spec(spec: str) -> tuple[BenchmarkFormat | None, Path]:
    """"lambada:FILE" -> (lambada's format, FILE); anything else -> (None, the path)."""
    name, sep, rest = spec.partition(":")
    if sep and name in BENCHMARK_FORMATS:
        return BENCHMARK_FORMATS.lookup(name), Path(rest).expanduser()
    return None, Path(spec).expanduser()


def detect_format(path: Path) -> BenchmarkFormat | None:
    """The format whose fields the file's first line has, or None (not a benchmark: a corpus, pairs)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        doc = json.loads(first)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    return next((fmt for name in BENCHMARK_FORMATS.names() if (fmt := BENCHMARK_FORMATS.lookup(name)).auto
                 and all(k in doc for k in fmt.fields)), None)


def is_benchmark(spec: str) -> bool:
    """Whether --data (or an eval_tasks entry) names a benchmark file rather than a corpus or pairs."""
    fmt, path = split_spec(spec)
    return fmt is not None or detect_format(path) is not None


def read_benchmark(spec: str) -> Benchmark:
    """Every item of the file, in order; a line that is not JSON, lacks a field or has a label outside
    its choices is one error naming the line."""
    fmt, path = split_spec(spec)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file '{path}' does not exist; pass a .jsonl file in one of the formats "
                                f"{', '.join(BENCHMARK_FORMATS.names())} (README: Benchmarks)")
    fmt = fmt or detect_format(path)
    if fmt is None:
        raise ValueError(f"{path}: its first line has none of the fields of a benchmark format "
                         + "; ".join(f"{f.name}: {', '.join(f.fields)}" for f in map(BENCHMARK_FORMATS.lookup,
                                                                                       BENCHMARK_FORMATS.names()))
                         + "; name the format before a colon, e.g. lambada:FILE")
    data = path.read_bytes()
    lines = [(n, line) for n, line in enumerate(data.decode("utf-8", errors="strict").splitlines(), 1) if line.strip()]
    labels = _piqa_labels(path, len(lines)) if fmt.name == "piqa" else None
    items = []
    for i, (n, line) in enumerate(lines):
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
            if labels is not None and "label" not in doc:
                doc["label"] = labels[i]
            missing = [k for k in fmt.fields if k not in doc]
            if missing:
                raise ValueError(f"no field {missing[0]!r} (a {fmt.name} line has {', '.join(fmt.fields)})")
            item = fmt.read(doc)
            if len(item.choices) < (2 if fmt.kind == "choice" else 1):
                raise ValueError(f"{len(item.choices)} choices: multiple choice needs two or more")
            if not 0 <= item.label < len(item.choices):
                raise ValueError(f"label {item.label} is not an index of its {len(item.choices)} choices")
            if not all(isinstance(c, str) for c in (item.context, *item.choices)):
                raise ValueError("the context and the choices must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = f"no field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}:{n}: not a {fmt.name} item: {what}") from None
        items.append(item)
    if not items:
        raise ValueError(f"{path} holds no items")
    return Benchmark(path.name.split(".")[0], path, fmt, items, hashlib.sha256(data).hexdigest())


def _piqa_labels(path: Path, n: int) -> list[int] | None:
    """PIQA's original release keeps its labels in <stem>-labels.lst beside the .jsonl, one per line."""
    lst = path.with_name(f"{path.stem}-labels.lst")
    if not lst.is_file():
        return None
    labels = [int(x) for x in lst.read_text().split()]
    if len(labels) != n:
        raise ValueError(f"{lst} has {len(labels)} labels for the {n} lines of {path}")
    return labels

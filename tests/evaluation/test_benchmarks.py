"""evaluation/benchmarks.py: each public format read as lm-eval reads it, told by its fields, and one-line
errors naming the line for what cannot be an item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import user_error, write_benchmarks
from evaluation.benchmarks import Item, is_benchmark, read_benchmark


def write_lines(path: Path, *docs: object) -> str:
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def test_each_format_is_told_by_its_fields_and_a_text_file_is_not_a_benchmark(tmp_path: Path, pairs_file: Path):
    files = write_benchmarks(tmp_path / "b")
    for fmt, path in files.items():
        if fmt == "lambada":  # {"text"} is what a corpus of documents looks like: named, never guessed
            assert not is_benchmark(str(path)) and is_benchmark(f"lambada:{path}")
            continue
        assert is_benchmark(str(path)) and read_benchmark(str(path)).format.name == fmt
    assert not is_benchmark(str(pairs_file))
    assert not is_benchmark(write_lines(tmp_path / "docs.jsonl", {"text": "a document"}))
    assert not is_benchmark("shakespeare") and not is_benchmark(str(tmp_path / "missing.jsonl"))


def test_hellaswag_is_lm_evals_query_and_cleaned_endings(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "hs.jsonl", {
        "activity_label": "Making tea", "ctx_a": "A man boils water.", "ctx_b": "then he [step] POURS it",
        "ctx": "ignored when ctx_a is there", "endings": [" into a cup [title] Done. ", "on  the floor."], "label": "1"})
    (item,) = read_benchmark(path).items
    # lm-eval: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()); the same for endings
    assert item == Item("Making tea: A man boils water. Then he pours it", ("into a cup. Done.", "on the floor."), 1)


def test_arc_in_both_published_layouts_and_piqa_with_its_labels_file(tmp_path: Path) -> None:
    flat = {"question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["1", "2"]}, "answerKey": "2"}
    nested = {"question": {"stem": "Which is hot?", "choices": [{"text": "ice", "label": "A"},
                                                                 {"text": "fire", "label": "B"}]}, "answerKey": "B"}
    expected = Item("Question: Which is hot?\nAnswer:", ("ice", "fire"), 1)
    assert read_benchmark(write_lines(tmp_path / "arc.jsonl", flat, nested)).items == [expected, expected]
    piqa = tmp_path / "valid.jsonl"
    write_lines(piqa, {"goal": "Boil water", "sol1": "use a pot", "sol2": "use a sieve"},
                {"goal": "Dry a cup", "sol1": "use a towel", "sol2": "use water"})
    (tmp_path / "valid-labels.lst").write_text("0\n0\n")
    assert [(i.context, i.label) for i in read_benchmark(str(piqa)).items] == [
        ("Question: Boil water\nAnswer:", 0), ("Question: Dry a cup\nAnswer:", 0)]
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with user_error("valid-labels.lst has 1 labels for the 2 lines"):
        read_benchmark(str(piqa))


def test_lambada_predicts_the_last_word_and_generic_keeps_its_delimiter(tmp_path: Path) -> None:
    (item,) = read_benchmark("lambada:" + write_lines(tmp_path / "l.jsonl", {"text": "he said  hello there"})).items
    assert item == Item("he said  hello", ("there",), 0, " ")
    (item,) = read_benchmark(write_lines(tmp_path / "g.jsonl", {"context": "2+2=", "choices": ["4", "5"], "label": 0,
                                                                "delimiter": ""})).items
    assert item == Item("2+2=", ("4", "5"), 0, "")


@pytest.mark.parametrize("line, fragments", [
    ('{"context": "a", "choices": ["x", "y"], "label": 2}', ("g.jsonl:2:", "label 2 is not an index of its 2 choices")),
    ('{"context": "a", "choices": ["x"], "label": 0}', ("g.jsonl:2:", "multiple choice needs two or more")),
    ('{"context": "a", "choices": ["x", "y"]', ("g.jsonl:2:", "not a generic item")),
    ('{"context": 3, "choices": ["x", "y"], "label": 0}', ("g.jsonl:2:", "must be strings")),
    ('{"context": "a", "label": 0}', ("g.jsonl:2:", "no field 'choices'")),
])
def test_a_bad_line_is_one_error_naming_it(tmp_path: Path, line: str, fragments: tuple[str, ...]) -> None:
    path = write_lines(tmp_path / "g.jsonl", {"context": "a", "choices": ["x", "y"], "label": 1}, line)
    with user_error(*fragments):
        read_benchmark(path)


def test_missing_file_unknown_fields_and_a_lambada_line_without_a_space(tmp_path: Path) -> None:
    with user_error("does not exist", kind=FileNotFoundError):
        read_benchmark(str(tmp_path / "nope.jsonl"))
    with user_error("none of the fields of a benchmark format", "lambada:FILE"):
        read_benchmark(write_lines(tmp_path / "docs.jsonl", {"text": "a document"}))
    with user_error("l.jsonl:1:", "no space"):
        read_benchmark("lambada:" + write_lines(tmp_path / "l.jsonl", {"text": "word"}))
    with user_error("answerKey 'E' is not one of"):
        read_benchmark(write_lines(tmp_path / "arc.jsonl", {"question": "q", "answerKey": "E",
                                                            "choices": {"text": ["a", "b"], "label": ["A", "B"]}}))

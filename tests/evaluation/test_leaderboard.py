"""runs.py leaderboard (evaluation/leaderboard.py): three trained runs ranked by their benchmark scores,
sorted by any column, filtered, written as text, markdown and CSV, with notes where runs are not
comparable."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

import evaluate
import runs
import train
from conftest import TINY_TEXT, call_main, user_error, write_benchmarks


@pytest.fixture(scope="module")
def board_runs(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """Three short runs (tags a, b, c: 5, 15 and 30 steps), each scored on the generic and hellaswag files;
    c is scored on lambada too, and b's generic score uses the first 6 items only."""
    root = tmp_path_factory.mktemp("board")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    files = write_benchmarks(root / "files")
    for tag, iters in (("a", 5), ("b", 15), ("c", 30)):
        call_main(train.main, "--config", "debug", "--data", str(corpus), "--runs-dir", str(root / "runs"),
                  "--data-dir", str(root / "data"), "--device", "cpu", "--dtype", "float32", "--sample-length", "0",
                  "--max-iters", str(iters), "--run-tag", tag, "--seed", str(iters))
    for run in sorted((root / "runs").iterdir()):
        for fmt in ("generic", "hellaswag"):
            call_main(evaluate.main, "--run", str(run), "--data", str(files[fmt]))
    return root / "runs", files


def records(run: Path) -> dict[str, dict]:
    return {r["name"]: r for r in (json.loads(p.read_text()) for p in sorted((run / "evals").glob("*.json")))}


def board_csv(runs_dir: Path, *args: str) -> tuple[list[dict], str]:
    res = call_main(runs.main, "--runs-dir", str(runs_dir), "leaderboard", "--format", "csv", *args)
    return list(csv.DictReader(io.StringIO(res.stdout))), res.stderr


def test_three_runs_ranked_by_their_mean_centred_accuracy(board_runs) -> None:
    runs_dir, _ = board_runs
    rows, notes = board_csv(runs_dir)
    assert [r["run"].split("_")[-1] for r in rows] and len(rows) == 3 and not notes
    expected = {}
    for run in runs_dir.iterdir():
        rec = records(run)
        expected[run.name] = (rec["generic_own"]["acc_norm_centered"] + rec["hellaswag_own"]["acc_norm_centered"]) / 2
        row = next(r for r in rows if r["run"] == run.name)
        assert float(row["hellaswag_own"]) == rec["hellaswag_own"]["acc_norm"]
        assert float(row["avg_centered"]) == pytest.approx(expected[run.name], abs=1e-12)
        assert int(row["params"]) > 0 and row["arch"] == "gpt2" and float(row["val_bpb"]) > 0
    assert [r["run"] for r in rows] == sorted(expected, key=lambda k: -expected[k])  # best first (ties: stable)
    assert list(rows[0]) == ["run", "arch", "params", "tokens", "val_bpb", "generic_own", "hellaswag_own", "avg_centered"]
    assert sorted(int(r["tokens"]) for r in rows) == [5 * 256, 15 * 256, 30 * 256]


def test_sorted_by_any_column_filtered_and_written_as_markdown(board_runs) -> None:
    runs_dir, _ = board_runs
    rows, _ = board_csv(runs_dir, "--sort", "val_bpb")
    assert [float(r["val_bpb"]) for r in rows] == sorted(float(r["val_bpb"]) for r in rows)  # lower is better
    rows, _ = board_csv(runs_dir, "--sort", "tokens", "--reverse")
    assert [int(r["tokens"]) for r in rows] == [5 * 256, 15 * 256, 30 * 256]
    rows, _ = board_csv(runs_dir, "--tag", "b")
    assert len(rows) == 1 and rows[0]["run"].endswith("_b")
    rows, _ = board_csv(runs_dir, "--glob", "*_[ac]")
    assert sorted(r["run"][-1] for r in rows) == ["a", "c"]
    rows, _ = board_csv(runs_dir, "--metric", "acc_bytes")
    for row in rows:
        assert float(row["generic_own"]) == records(runs_dir / row["run"])["generic_own"]["acc_bytes"]
    md = call_main(runs.main, "--runs-dir", str(runs_dir), "leaderboard", "--format", "markdown").stdout.splitlines()
    assert md[0].startswith("| run | arch |") and md[1].startswith("|---|") and len(md) == 5
    text = call_main(runs.main, "--runs-dir", str(runs_dir), "leaderboard").stdout.splitlines()
    assert text[0].split() == ["run", "arch", "params", "tokens", "val_bpb", "generic_own", "hellaswag_own",
                               "avg_centered"] and "%" in text[1]
    with user_error("--sort 'nope' is not a column", "avg_centered"):
        call_main(runs.main, "--runs-dir", str(runs_dir), "leaderboard", "--sort", "nope")


def test_a_missing_score_and_other_items_are_said(board_runs, tmp_path: Path) -> None:
    runs_dir, files = board_runs
    run_c = next(p for p in runs_dir.iterdir() if p.name.endswith("_c"))
    run_b = next(p for p in runs_dir.iterdir() if p.name.endswith("_b"))
    call_main(evaluate.main, "--run", str(run_c), "--data", f"lambada:{files['lambada']}")
    few = tmp_path / "generic_own.jsonl"
    few.write_text("".join(files["generic"].read_text().splitlines(keepends=True)[:6]))
    call_main(evaluate.main, "--run", str(run_b), "--data", str(few))  # the newest generic_own record of b: 6 items
    rows, notes = board_csv(runs_dir)
    assert rows[0]["run"] == run_c.name and rows[0]["avg_centered"]  # c alone has all three: an average
    assert [r["avg_centered"] == "" for r in rows].count(True) == 2
    assert "mean over all 3 benchmarks" in notes and "generic_own: runs were scored on different items" in notes
    assert "6 items" in notes


def test_no_scored_run_says_how_to_score_one(tmp_path: Path, trained_run: Path) -> None:
    res = call_main(runs.main, "--runs-dir", str(tmp_path), "leaderboard")
    assert "has a benchmark score" in res.stdout and "--eval-tasks" in res.stdout

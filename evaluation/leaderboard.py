"""The leaderboard's numbers: each run's newest score on each benchmark (its evals/ records, from
evaluate.py or from training's eval_tasks), one metric per benchmark, and their mean centred accuracy.

    board = build_board([benchmark_records(r) for r in runs], facts)   # facts: runs.py's (run, arch, ...)
    print(render(board, "markdown"))                  # text, markdown or csv

A benchmark's column shows its headline metric (acc_norm for multiple choice, acc for a last word) or
the metric asked for; `avg_centered` is the mean over the table's benchmarks of (metric - chance) /
(1 - chance), so a 2-choice and a 4-choice task weigh alike (nanochat's CORE score is such a mean). A
run without a score on every benchmark has no average. Two runs scored on different items (another
file, or another number of items) are compared with a note, never silently.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from evaluation.likelihood import ACCURACIES, headline
from rundir.run_dir import RunDir
from utils.files import read_json_object

AVERAGE = "avg_centered"
LOWER_IS_BETTER = {"val_bpb", "best_val"}


@dataclass
class Board:
    columns: list[str]                  # run facts, then one per benchmark, then avg_centered
    rows: list[dict]                    # column -> value (None: the run has none)
    notes: list[str] = field(default_factory=list)


def benchmark_records(run: RunDir) -> dict[str, dict]:
    """name -> the run's newest benchmark record of that name (by the files' times: two saved in one second
    share a timestamp in their names)."""
    out = {}
    for path in sorted(run.eval_records(), key=lambda p: p.stat().st_mtime_ns):
        try:
            record = read_json_object(path)
        except ValueError:
            continue  # a damaged record is runs.py show's to report; the board shows what it can read
        if "benchmark" in record and record.get("items"):
            out[record["name"]] = record
    return out


def build_board(records: list[dict[str, dict]], facts: list[dict], metric: str | None = None) -> Board:
    """One row per run from its facts and its benchmark_records(): each benchmark's metric and the mean
    centred metric."""
    if metric is not None and metric not in ACCURACIES:
        raise ValueError(f"--metric {metric!r}: choose one of {', '.join(ACCURACIES)}")
    names = sorted({name for r in records for name in r})
    board = Board([*facts[0], *names, AVERAGE] if facts else [], [])
    for fact, recs in zip(facts, records):
        row, centred = dict(fact), []
        for name in names:
            record = recs.get(name)
            chosen = _metric(record, metric) if record else None
            row[name] = record[chosen] if chosen else None
            centred.append(record.get(f"{chosen}_centered") if chosen else None)
        row[AVERAGE] = sum(centred) / len(centred) if centred and None not in centred else None
        board.rows.append(row)
    board.notes += _differing_items(names, records, [f["run"] for f in facts])
    if any(r[AVERAGE] is None for r in board.rows) and names:
        board.notes.append(f"{AVERAGE} is the mean over all {len(names)} benchmarks: runs without a score on each "
                           "have none (evaluate.py --run R --data FILE scores one)")
    return board


def _metric(record: dict, metric: str | None) -> str | None:
    """The metric a benchmark's column shows: the one asked for (multiple choice only), else its headline."""
    if metric and record["kind"] == "choice":
        return metric
    return headline(record)[0]


def _differing_items(names: list[str], records: list[dict], runs: list[str]) -> list[str]:
    notes = []
    for name in names:
        seen = {(r[name]["data_sha256"], r[name]["items"]): run for r, run in zip(records, runs) if name in r}
        if len(seen) > 1:
            notes.append(f"{name}: runs were scored on different items ({len(seen)} versions of the file or numbers "
                         f"of items: {', '.join(f'{run} {items:,} items' for (_, items), run in seen.items())}); "
                         "compare them with care")
    return notes


def sort_board(board: Board, column: str, reverse: bool = False) -> None:
    """Best first: lower val_bpb and val loss, higher anything else numeric; text columns A to Z. Rows
    without the value go last either way."""
    if column not in board.columns:
        raise ValueError(f"--sort {column!r} is not a column; choose one of {', '.join(board.columns)}")
    present = [r for r in board.rows if r.get(column) is not None]
    numeric = all(isinstance(r[column], (int, float)) for r in present)
    descending = numeric and column not in LOWER_IS_BETTER
    present.sort(key=lambda r: r[column] if numeric else str(r[column]), reverse=descending != reverse)
    board.rows = present + [r for r in board.rows if r.get(column) is None]


def render(board: Board, fmt: str, cell) -> str:
    """text (aligned columns), markdown (a table) or csv (raw numbers); `cell(column, value)` formats."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(board.columns)
        plain = lambda v: "" if v is None else int(v) if isinstance(v, float) and v.is_integer() else v  # noqa: E731
        writer.writerows([[plain(r[c]) for c in board.columns] for r in board.rows])
        return out.getvalue().rstrip("\n")
    rows = [[cell(c, r[c]) for c in board.columns] for r in board.rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(board.columns) + " |", "|" + "|".join("---" for _ in board.columns) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in [c, *(row[i] for row in rows)]) for i, c in enumerate(board.columns)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [board.columns, *rows])

"""eval_tasks: benchmark files scored at every eval of a training run, tracked like the loss (TensorBoard,
metrics.jsonl, status.json), and saved for the exported weights as evaluate.py would save them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate
import train
from conftest import call_main, user_error, write_benchmarks

SCORES = ("acc", "acc_norm", "acc_bytes", "acc_per_token", "items", "skipped", "data_sha256")


def train_args(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return ["--config", "debug", "--data", str(corpus), "--runs-dir", str(tmp_path / "runs"), "--data-dir",
            str(tmp_path / "data"), "--device", "cpu", "--dtype", "float32", "--sample-length", "0", *extra]


def test_a_run_tracks_its_benchmarks_and_saves_what_evaluate_py_gives(tmp_path: Path, tiny_corpus: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = write_benchmarks(tmp_path / "files")
    tasks = f"{files['hellaswag']},lambada:{files['lambada']}"
    res = call_main(train.main, *train_args(tmp_path, tiny_corpus, "--eval-tasks", tasks, "--eval-task-items", "0"))
    assert res.returncode == 0, res.stderr
    assert "eval step 20:" in res.stdout and "| hellaswag_own acc_norm " in res.stdout and "| lambada_own acc " in res.stdout
    (run,) = (tmp_path / "runs").iterdir()
    scalars = EventAccumulator(str(run / "logs" / "tensorboard")).Reload().Tags()["scalars"]
    assert {"eval/hellaswag_own/acc_norm", "eval/hellaswag_own/acc_norm_centered", "eval/lambada_own/loss"} <= set(scalars)
    steps = [e.step for e in EventAccumulator(str(run / "logs" / "tensorboard")).Reload()
             .Scalars("eval/hellaswag_own/acc_norm")]
    assert steps == [0, 10, 20]  # the step-0 eval, then every eval_interval
    lines = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/hellaswag_own/acc" in line] == [0, 10, 20]
    status = json.loads((run / "meta" / "status.json").read_text())
    assert status["benchmarks"]["hellaswag_own"]["metric"] == "acc_norm"
    assert status["benchmarks"]["lambada_own"]["metric"] == "acc"
    saved = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in (run / "evals").glob("*.json")}
    assert set(saved) == {"hellaswag_own", "lambada_own"} and saved["hellaswag_own"]["iteration"] == 20
    # the training run's numbers are evaluate.py's on the export (float32 both, the same items)
    call_main(evaluate.main, "--run", str(run), "--data", str(files["hellaswag"]), "--name", "again")
    (again,) = [json.loads(p.read_text()) for p in (run / "evals").glob("*_again.json")]
    assert {k: saved["hellaswag_own"][k] for k in SCORES} == {k: again[k] for k in SCORES}
    assert status["benchmarks"]["hellaswag_own"]["value"] == again["acc_norm"]


def test_eval_task_items_scores_the_first_items_and_says_so(tmp_path: Path, tiny_corpus: Path) -> None:
    files = write_benchmarks(tmp_path / "files")
    res = call_main(train.main, *train_args(tmp_path, tiny_corpus, "--eval-tasks", str(files["generic"]),
                                            "--eval-task-items", "5", "--max-iters", "10"))
    assert "generic_own.jsonl has 12 items; each eval scores the first 5" in res.stdout
    (run,) = (tmp_path / "runs").iterdir()
    (record,) = [json.loads(p.read_text()) for p in (run / "evals").glob("*.json")]
    assert record["items"] == 5


@pytest.mark.parametrize("spec, fragments", [
    ("missing.jsonl", ("benchmark file", "missing.jsonl", "does not exist")),
    ("{docs}", ("none of the fields of a benchmark format",)),
    ("{hellaswag},{hellaswag}", ("two files are named 'hellaswag_own'",)),
])
def test_a_bad_eval_task_is_refused_before_the_run_exists(tmp_path: Path, tiny_corpus: Path, spec: str,
                                                             fragments: tuple[str, ...]) -> None:
    files = write_benchmarks(tmp_path / "files")
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n')
    spec = spec.format(docs=docs, hellaswag=files["hellaswag"])
    kind = FileNotFoundError if "missing" in spec else ValueError
    with user_error(*fragments, kind=kind):
        call_main(train.main, *train_args(tmp_path, tiny_corpus, "--eval-tasks", spec))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

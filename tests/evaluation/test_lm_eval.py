"""evaluate.py's benchmark numbers equal lm-evaluation-harness's on the same items, for a gpt2-tokenizer
run and a char run: lm-eval's `hf` model reads the run's hf/ export through local task YAMLs
(benchmarks/lm_eval_tasks.py: its own hellaswag, arc, piqa and lambada templates over our files).
Skipped where lm-eval is not installed; nothing is downloaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_TEXT, benchmark_scores, call_main, write_benchmarks

pytest.importorskip("lm_eval")
sys.path.insert(0, str(REPO / "benchmarks"))

from lm_eval_tasks import MC_METRICS, run_lm_eval, write_tasks  # noqa: E402



def assert_equal_to_lm_eval(run: Path, files: dict[str, Path], tmp_path: Path, extra_model_args: str = "") -> None:
    tasks = write_tasks(tmp_path / "tasks", files)
    theirs = run_lm_eval(run / "artifacts" / "export" / "hf", tmp_path / "tasks", tasks, tmp_path / "out",
                         extra_model_args=extra_model_args)
    for fmt, task in zip(files, tasks):
        ours, lls = benchmark_scores(run, f"{fmt}:{files[fmt]}")
        assert ours["items"] == len(theirs[task]["lls"]) and not ours["skipped"]
        for mine, lm in zip(lls, theirs[task]["lls"], strict=True):
            np.testing.assert_allclose(mine, lm, atol=1e-4, err_msg=fmt)
        if fmt == "lambada":
            assert ours["acc"] == theirs[task]["acc"]
            assert ours["perplexity"] == pytest.approx(theirs[task]["perplexity"], rel=1e-5)
        else:
            assert {m: ours[m] for m in MC_METRICS} == {m: theirs[task][m] for m in MC_METRICS}, fmt


@pytest.mark.slow
def test_a_gpt2_tokenizer_run_scores_as_lm_eval(tmp_path: Path) -> None:
    import train

    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    res = call_main(train.main, "--config", "debug", "--tokenizer", "gpt2", "--max-iters", "5", "--data", str(corpus),
                    "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                    "--dtype", "float32", "--sample-length", "0")
    assert res.returncode == 0, res.stderr
    (run,) = (tmp_path / "runs").iterdir()
    files = write_benchmarks(tmp_path / "files")
    # BPE boundaries and bytes: trailing spaces that move to the continuation, multi-byte characters
    # (acc_bytes then differs from acc_norm), a context longer than block_size (cut from the left)
    files["generic"].write_text("".join(json.dumps(d) + "\n" for d in [
        {"context": "The dish was ", "choices": ["café crème", "naïve", "soup"], "label": 0},
        {"context": "Answer:  ", "choices": ["yes", "no"], "label": 1},
        {"context": " ".join(["long"] * 60), "choices": ["end of it", "€€€"], "label": 0},
    ]), encoding="utf-8")
    assert_equal_to_lm_eval(run, files, tmp_path)


@pytest.mark.slow
def test_a_char_run_scores_as_lm_eval_given_the_documented_prefix_token(trained_run: Path, tmp_path: Path) -> None:
    files = write_benchmarks(tmp_path / "files")
    # ARC's and PIQA's "Question:" has a Q the tiny corpus lacks: a char model skips those items (test_likelihood)
    readable = {fmt: files[fmt] for fmt in ("hellaswag", "generic", "lambada")}
    # A char export without end-of-text has no prefix token; lm-eval needs one (README: Benchmarks)
    assert_equal_to_lm_eval(trained_run, readable, tmp_path, extra_model_args=",prefix_token_id=0")
